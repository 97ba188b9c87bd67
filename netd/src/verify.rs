//! Reads back what a task's attach made in the kernel and says what differs: CNI's CHECK
//! and a person asking "is this task really plugged in?". Only reads; repairing is the
//! reconciler's job.

use std::path::Path;

use anyhow::Result;

use crate::model::{mac_for_ip, Task};
use crate::naming;
use crate::netlink;
use crate::netns::{self, Netns};

/// Every way the task's namespace differs from what its record says: a missing
/// interface, a wrong address or MAC, a link down, a missing default route. Empty when
/// all is as attached.
pub async fn task_problems(task: &Task) -> Result<Vec<String>> {
    let path = Path::new(&task.netns).to_path_buf();
    if let Err(e) = netns::check_netns_path(&path) {
        return Ok(vec![e]);
    }
    let task = task.clone();
    netns::with_netlink(&Netns::Path(path), move |h| async move {
        let mut problems = vec![];
        let links = netlink::links(&h).await?;
        for ep in &task.endpoints {
            let Some(link) = links.iter().find(|l| l.name == ep.ifname) else {
                problems.push(format!("interface {} is missing", ep.ifname));
                continue;
            };
            if link.alias.as_deref() != Some(naming::endpoint_alias(&ep.id).as_str()) {
                problems.push(format!(
                    "interface {} is not netd's endpoint {} (its alias is {:?})",
                    ep.ifname, ep.id, link.alias
                ));
            }
            if link.mac != mac_for_ip(ep.ip) {
                problems.push(format!(
                    "interface {} has another MAC than {}",
                    ep.ifname, ep.mac
                ));
            }
            if !link.up {
                problems.push(format!("interface {} is down", ep.ifname));
            }
            let addrs = netlink::ipv4_addresses(&h, link.index).await?;
            if !addrs.contains(&(ep.ip, ep.prefix)) {
                problems.push(format!(
                    "interface {} lacks address {}/{}",
                    ep.ifname, ep.ip, ep.prefix
                ));
            }
        }
        if let Some(gw) = task.default_gateway {
            match netlink::default_route(&h).await? {
                Some((via, _)) if via == gw => {}
                Some((via, _)) => problems.push(format!(
                    "the default route goes via {via}, not the gateway {gw}"
                )),
                None => problems.push(format!("the default route via {gw} is missing")),
            }
        }
        Ok(problems)
    })
    .await
}
