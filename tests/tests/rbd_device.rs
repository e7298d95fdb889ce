//! The RBD device against a real single-node Ceph cluster (scripts/ceph-cluster.sh): the
//! storage conformance suite, reads and writes across objects, flush, resize, allocation status,
//! snapshots opened read-only, and completions delivered to a consumer's eventfd.

use std::sync::Arc;

use strata_storage::conformance::run_all;
use strata_storage::volume::rbd::{image, Cluster, Image, Pool, RbdDevice};
use strata_storage::BlockDevice;
use strata_tests::ceph::{cluster, unique, TestCluster};

fn pool(c: &TestCluster) -> Arc<Pool> {
    let cl = Cluster::connect(&c.spec()).unwrap();
    Arc::new(cl.pool(&c.pool).unwrap())
}

fn fresh(pool: &Arc<Pool>, size: u64) -> Arc<dyn BlockDevice> {
    let name = unique("conf");
    image::create(pool, &name, size).unwrap();
    let img = Image::open(pool, &name, None, false).unwrap();
    Arc::new(RbdDevice::new(&name, img, false, None).unwrap())
}

fn conformance() {
    let c = cluster();
    let pool = pool(c);
    let make = |size: u64| fresh(&pool, size);
    run_all(&make, 24);
}

strata_testkit::main!(conformance,);
