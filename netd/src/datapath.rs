//! The load-balancing seam. Both future datapaths (eBPF and userspace) consume the same
//! [`LbTable`], computed here from the desired state, so they balance the same backends.
//! This build has no datapath that moves VIP traffic yet: the daemon says so in
//! `netd status` instead of pretending, and VIPs are allocated but carry no traffic.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::Serialize;

use crate::model::EndpointMode;
use crate::state::State;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Auto,
    Ebpf,
    Userspace,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "ebpf" => Ok(Mode::Ebpf),
            "userspace" => Ok(Mode::Userspace),
            other => Err(format!(
                "unknown datapath {other:?}: use auto, ebpf or userspace"
            )),
        }
    }
}

/// One VIP and the task IPs behind it, in a stable order (the round-robin order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipEntry {
    pub service: String,
    pub network: String,
    pub vip: Ipv4Addr,
    pub backends: Vec<Ipv4Addr>,
}

/// The load-balancing state every datapath reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LbTable {
    pub vips: BTreeMap<Ipv4Addr, VipEntry>,
}

impl LbTable {
    pub fn from_state(st: &State) -> Self {
        let mut vips = BTreeMap::new();
        for svc in st.services.values() {
            if svc.endpoint_mode != EndpointMode::Vip {
                continue;
            }
            for (network, vip) in &svc.vips {
                let mut backends: Vec<Ipv4Addr> = st
                    .tasks
                    .values()
                    .filter(|t| t.service == svc.name)
                    .flat_map(|t| t.endpoints.iter())
                    .filter(|e| &e.network == network)
                    .map(|e| e.ip)
                    .collect();
                backends.sort();
                vips.insert(
                    *vip,
                    VipEntry {
                        service: svc.name.clone(),
                        network: network.clone(),
                        vip: *vip,
                        backends,
                    },
                );
            }
        }
        LbTable { vips }
    }
}

/// What a datapath implementation must do; implemented by the eBPF and userspace paths.
pub trait Datapath: Send + Sync {
    /// Makes the datapath balance exactly `table`, atomically per VIP.
    fn apply(&self, table: &LbTable) -> anyhow::Result<()>;
    /// For `netd status`.
    fn status(&self) -> DatapathStatus;
}

#[derive(Debug, Clone, Serialize)]
pub struct DatapathStatus {
    pub requested: Mode,
    /// The datapath in use, or `none`.
    pub active: String,
    pub reason: String,
}

/// What `netd status` reports while no datapath exists in this build.
pub fn unavailable(requested: Mode) -> DatapathStatus {
    DatapathStatus {
        requested,
        active: "none".into(),
        reason: "VIP load balancing is not implemented in this build: service VIPs are \
                 allocated but carry no traffic; tasks reach each other by task IP"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{self, fixture, NetworkCreate, ServiceCreate, TaskAttach};

    #[tokio::test]
    async fn the_table_lists_each_vip_with_its_task_ips() {
        let (_dir, s) = fixture::setup().await;
        let pools = fixture::pools();
        state::create_network(
            &s,
            &pools,
            NetworkCreate {
                name: "front".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let svc = state::create_service(
            &s,
            ServiceCreate {
                name: "web".into(),
                networks: vec!["front".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut ips = vec![];
        for i in 0..3 {
            let t = state::attach_task(
                &s,
                "n1",
                TaskAttach {
                    service: "web".into(),
                    netns: format!("/run/netns/t{i}"),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            ips.push(t.endpoints[0].ip);
        }
        let st = State::load(&s).await.unwrap();
        let table = LbTable::from_state(&st);
        let vip = svc.vips["front"];
        ips.sort();
        assert_eq!(table.vips[&vip].backends, ips);
        assert!(!ips.contains(&vip));
    }
}
