//! `strata vg …` on volume groups on Ceph RBD: create-rbd, show, remove; the PV verbs (extend,
//! reduce, check) do not apply to them.

use std::process::ExitCode;

use anyhow::bail;
use strata_storage::volume::VolumeStore;

use super::{CreateRbdArgs, VgCommand};

#[cfg(feature = "rbd")]
pub fn create(a: CreateRbdArgs, store: &VolumeStore) -> anyhow::Result<()> {
    use crate::cli::Output;
    use strata_storage::volume::rbd_groups::RbdGroupRecord;
    let record = RbdGroupRecord {
        name: a.name.clone(),
        conf: std::path::absolute(&a.conf)?,
        user: a.user,
        keyring: a.keyring.map(std::path::absolute).transpose()?,
        pool: a.pool,
    };
    let group = store.rbd_group_create(&record)?;
    match a.out.output {
        Output::Json => match group {
            strata_storage::volume::Group::Rbd(g) => {
                println!("{}", serde_json::to_string_pretty(&g.info()?)?)
            }
            strata_storage::volume::Group::Local(_) => bail!("an RBD group opened as local"),
        },
        Output::Human => println!(
            "Volume group {} created on Ceph pool {}",
            record.name, record.pool
        ),
    }
    Ok(())
}

#[cfg(not(feature = "rbd"))]
pub fn create(_a: CreateRbdArgs, _store: &VolumeStore) -> anyhow::Result<()> {
    bail!("this strata was built without RBD support (the `rbd` feature)")
}

#[cfg(feature = "rbd")]
pub fn run(cmd: &VgCommand, name: &str, store: &VolumeStore) -> anyhow::Result<ExitCode> {
    let Some(record) = store.rbd_groups().get(name)? else {
        bail!("volume group {name} is not an RBD group");
    };
    use crate::cli::Output;
    match cmd {
        VgCommand::Show(a) => {
            let g = strata_storage::volume::rbd::RbdGroup::open(&record, true)?;
            let info = g.info()?;
            match a.out.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
                Output::Human => {
                    use strata_storage::util::format_size;
                    println!("volume group: {} (Ceph RBD)", info.name);
                    println!("pool: {}", info.pool);
                    println!("configuration: {}  user: client.{}", info.conf, info.user);
                    println!("volumes: {}", info.volumes);
                    println!(
                        "pool usage: {}{}",
                        format_size(info.used_bytes),
                        if info.quota_bytes > 0 {
                            format!(" of a quota of {}", format_size(info.quota_bytes))
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        VgCommand::Remove(a) => {
            store.rbd_group_remove(name)?;
            match a.out.output {
                Output::Json => println!("{}", serde_json::json!({ "removed": name })),
                Output::Human => println!(
                    "Volume group {name} removed (pool {} is left as it is)",
                    record.pool
                ),
            }
        }
        _ => bail!(
            "volume group {name} is on Ceph RBD: it has no PVs to extend, reduce or check \
             (Ceph manages its storage; `ceph health` checks it)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "rbd"))]
pub fn run(_cmd: &VgCommand, name: &str, _store: &VolumeStore) -> anyhow::Result<ExitCode> {
    bail!("volume group {name} is on Ceph RBD, and this strata was built without RBD support")
}
