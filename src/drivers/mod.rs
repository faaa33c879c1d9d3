//! Device drivers, each found through the device tree by `compatible`.

pub mod pl011;
pub mod psci;
