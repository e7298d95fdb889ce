//! A slab: values kept in reusable numbered slots, so that a slot number can travel as a lower
//! request's tag and find its value again when the completion comes back.

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `t`; returns its slot.
    pub(crate) fn insert(&mut self, t: T) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(t);
                i
            }
            None => {
                self.items.push(Some(t));
                self.items.len() - 1
            }
        }
    }

    /// Takes the value out of slot `i`, if there is one.
    pub(crate) fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take();
        if t.is_some() {
            self.free.push(i);
            self.len -= 1;
        }
        t
    }

    /// The value in slot `i`, mutably.
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }

    /// Values stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The slots holding a value.
    pub(crate) fn ids(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| self.items[i].is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_counted() {
        let mut s = Slab::default();
        let a = s.insert('a');
        let b = s.insert('b');
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some('a'));
        assert_eq!(s.remove(a), None);
        let c = s.insert('c');
        assert_eq!(c, a);
        assert_eq!(s.get_mut(b), Some(&mut 'b'));
        assert_eq!(s.ids(), vec![a, b]);
    }
}
