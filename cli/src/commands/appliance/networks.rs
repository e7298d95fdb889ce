//! `strata networks …`: the bridges VMs' NICs join (local, or on a server with --remote).

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::print::{print_array, print_object, Column};
use super::{encode, Api, Common};

#[derive(Debug, Subcommand)]
pub enum NetworksCommand {
    /// List networks with their bridges' state and ports.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show one network.
    Show {
        /// The network.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Create a network on bridge BR (created, or adopted if it exists), with an uplink port.
    Create {
        /// Name of the network.
        name: String,
        /// The bridge.
        #[arg(long)]
        bridge: String,
        /// Make the new bridge VLAN-aware (NICs may then name a VLAN with vlan=N).
        #[arg(long)]
        vlan_aware: bool,
        /// An interface to make a port of the bridge (the physical uplink).
        #[arg(long)]
        uplink: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a network no VM uses (its bridge goes too if Strata created it).
    Remove {
        /// The network.
        name: String,
    },
}

const NETWORK_COLUMNS: &[Column] = &[
    Column::text("NAME", "definition.name"),
    Column::text("BRIDGE", "definition.bridge"),
    Column::text("VLAN-AWARE", "definition.vlan_aware"),
    Column::text("UPLINK", "definition.uplink"),
    Column::text("PRESENT", "present"),
    Column::text("UP", "up"),
    Column::text("PORTS", "ports"),
];

/// Runs a `networks` command.
pub fn networks(cmd: NetworksCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworksCommand::List { common } => {
            let v = api.ok("GET", "/api/networks", None)?;
            print_array(&v, common.output, NETWORK_COLUMNS);
        }
        NetworksCommand::Show { name, common } => {
            let v = api.ok("GET", &format!("/api/networks/{}", encode(&name)), None)?;
            print_object(&v, common.output, "");
        }
        NetworksCommand::Create {
            name,
            bridge,
            vlan_aware,
            uplink,
            common,
        } => {
            let body = json!({"name": name, "bridge": bridge, "vlan_aware": vlan_aware,
                              "uplink": uplink});
            let v = api.ok("POST", "/api/networks", Some(&body))?;
            print_object(
                &v,
                common.output,
                &format!("Created network {name} on {bridge}"),
            );
        }
        NetworksCommand::Remove { name } => {
            api.ok("DELETE", &format!("/api/networks/{}", encode(&name)), None)?;
            println!("Removed network {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
