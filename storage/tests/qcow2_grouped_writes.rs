//! Allocating writes that cover whole clusters contiguous on the host reach the host file as
//! one request (not one per cluster), read back exactly, and survive a flush and reopen.

use std::collections::BTreeMap;

use strata_storage::format::qcow2::{self, Qcow2Options};
use strata_storage::format::{create_image, ImageFormat};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::FaultDevice;
use strata_storage::{BlockDevice, HostFile};

const SIZE: u64 = 16 << 20;
const CLUSTER: usize = 65536;

#[test]
fn whole_cluster_allocations_go_out_as_one_host_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    create_image(&p, ImageFormat::Qcow2, SIZE, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (dev, ctl) = FaultDevice::new(bytes.len() as u64);
    dev.write_all_at(0, &bytes).unwrap();
    dev.sync_data().unwrap();
    let img = qcow2::open(dev.clone(), &Qcow2Options::default()).unwrap();
    let data: Vec<u8> = (0..16 * CLUSTER)
        .map(|i| (i / 4096 % 251) as u8 + 1)
        .collect();
    let mut q = BlockingQueue::open(img.as_ref(), 4).unwrap();
    // Warm the metadata: the L2 table and the refcount block exist and are cached afterwards.
    q.write_at(40 * CLUSTER as u64, &data[..CLUSTER]).unwrap();
    let before = ctl.ops();
    q.write_at(CLUSTER as u64, &data).unwrap();
    let host_ops = ctl.ops() - before;
    // Sixteen fresh clusters: one data write (metadata waits for the flush), at most one more
    // if the file is grown ahead. Without grouping this was sixteen.
    assert!(host_ops <= 2, "{host_ops} host requests for 16 clusters");
    // A partial cluster in the middle of a run is not grouped, and still lands right.
    q.write_at(20 * CLUSTER as u64 + 512, &data[..3 * CLUSTER])
        .unwrap();
    assert!(q.read_at(CLUSTER as u64, data.len()).unwrap() == data);
    img.flush().unwrap();
    drop(q);
    drop(img);
    let img = qcow2::open(dev, &Qcow2Options::default()).unwrap();
    let mut q = BlockingQueue::open(img.as_ref(), 4).unwrap();
    assert!(q.read_at(CLUSTER as u64, data.len()).unwrap() == data);
    assert!(q.read_at(20 * CLUSTER as u64 + 512, 3 * CLUSTER).unwrap()[..] == data[..3 * CLUSTER]);
    assert!(q.read_at(0, CLUSTER).unwrap().iter().all(|&b| b == 0));
}
