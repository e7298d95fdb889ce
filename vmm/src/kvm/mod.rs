//! KVM: the VM (memory, in-kernel irqchip and PIT, ioeventfds, irqfds) and its vCPUs.

pub mod vcpu;
pub mod vm;

pub use vcpu::{Vcpu, VcpuExitReason};
pub use vm::Vm;
