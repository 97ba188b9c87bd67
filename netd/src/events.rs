//! What changed in the cluster, as a stream (`netd events`, `GET /v1/events`), the way
//! `docker events` tells it: networks, services and tasks created and removed, tasks
//! draining and turning unhealthy or healthy again, nodes joining, ready and down.
//!
//! Events are derived from the node's view: each revision it passes on names the keys
//! that changed, and [`between`] compares the objects behind them in the state before
//! and after (a pure function). The daemon keeps the latest [`KEPT`] events, so a
//! client that reconnects can ask for what it missed (`since`); older ones are gone, as
//! in the store's own history after a compaction.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::state::State;
use crate::store::ROOT;
use crate::view::View;

/// Events kept for clients that ask from an earlier revision.
pub const KEPT: usize = 10_000;

/// One thing that happened, at one store revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub revision: u64,
    /// Seconds since the epoch, when this node saw it.
    pub time: u64,
    /// network, service, task or node.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// create, remove, update, draining, unhealthy, healthy, join, leave, ready, down.
    pub action: &'static str,
    pub id: String,
    pub name: String,
    /// What a reader needs without asking again (a task's service and node, say).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<&'static str, String>,
}

/// The kinds a filter may name.
pub const KINDS: [&str; 4] = ["network", "service", "task", "node"];

/// The events from `prev` to `next` for the keys that changed (full keys, under
/// `/netd/`), in key order.
pub fn between<'a>(
    prev: &State,
    next: &State,
    changed: impl IntoIterator<Item = &'a str>,
    time: u64,
) -> Vec<Event> {
    let event = |kind: &'static str, action: &'static str, id: &str, name: &str| Event {
        revision: next.revision,
        time,
        kind,
        action,
        id: id.to_string(),
        name: name.to_string(),
        attributes: BTreeMap::new(),
    };
    // A task's event names its service and node.
    let of_task = |action: &'static str, t: &crate::model::Task| {
        let mut e = event("task", action, &t.id, &t.name);
        e.attributes.insert("service", t.service.clone());
        e.attributes.insert("node", t.node.clone());
        e
    };
    let mut out = vec![];
    for key in changed {
        let Some((kind, name)) = key.strip_prefix(ROOT).and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        match kind {
            "networks" => match (prev.networks.get(name), next.networks.get(name)) {
                (None, Some(n)) => {
                    let mut e = event("network", "create", &n.id, name);
                    e.attributes
                        .insert("driver", format!("{:?}", n.driver).to_lowercase());
                    e.attributes.insert("subnet", n.subnet.to_string());
                    out.push(e);
                }
                (Some(n), None) => out.push(event("network", "remove", &n.id, name)),
                _ => {}
            },
            "services" => match (prev.services.get(name), next.services.get(name)) {
                (None, Some(_)) => out.push(event("service", "create", name, name)),
                (Some(_), None) => out.push(event("service", "remove", name, name)),
                (Some(a), Some(b)) if a != b => out.push(event("service", "update", name, name)),
                _ => {}
            },
            "tasks" => match (prev.tasks.get(name), next.tasks.get(name)) {
                (None, Some(t)) => out.push(of_task("create", t)),
                (Some(t), None) => out.push(of_task("remove", t)),
                (Some(a), Some(b)) if a.draining.is_none() && b.draining.is_some() => {
                    out.push(of_task("draining", b))
                }
                _ => {}
            },
            "taskhealth" => {
                let was = prev.task_health.get(name).map(|h| h.healthy);
                let health = next.task_health.get(name);
                let action = match (was, health.map(|h| h.healthy)) {
                    (was, Some(false)) if was != Some(false) => "unhealthy",
                    // Its first passing probe, or one after failing.
                    (None | Some(false), Some(true)) => "healthy",
                    _ => continue,
                };
                if let Some(t) = next.tasks.get(name) {
                    let mut e = of_task(action, t);
                    if let Some(d) = health.and_then(|h| h.detail.clone()) {
                        e.attributes.insert("detail", d);
                    }
                    out.push(e);
                }
            }
            "nodes" => match (prev.nodes.contains_key(name), next.nodes.contains_key(name)) {
                (false, true) => out.push(event("node", "join", name, name)),
                (true, false) => out.push(event("node", "leave", name, name)),
                _ => {}
            },
            "alive" => match (prev.node_alive(name), next.node_alive(name)) {
                (false, true) => out.push(event("node", "ready", name, name)),
                (true, false) => out.push(event("node", "down", name, name)),
                _ => {}
            },
            _ => {}
        }
    }
    out
}

/// Which events a client wants: every kind, or the ones named.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kinds: Vec<String>,
}

impl Filter {
    pub fn admits(&self, e: &Event) -> bool {
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == e.kind)
    }
}

/// Why a client cannot have the events it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gap {
    /// Asked from before what is kept: the lowest `since` that can be served.
    TooOld(u64),
}

/// Every key of either state, once each, in key order: a comparison of the whole.
fn whole<'a>(a: &'a State, b: &'a State) -> Vec<&'a str> {
    let mut keys: Vec<&str> = a.keys().chain(b.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The node's event stream: the latest events, and a feed of new ones.
pub struct Events {
    kept: Mutex<VecDeque<Event>>,
    /// Events before this revision are no longer kept (0: none was dropped yet).
    dropped_before: Mutex<u64>,
    feed: broadcast::Sender<Event>,
}

impl Events {
    /// Follows `view` from now on (a task that runs for as long as the daemon): what
    /// happened before is not known here, so `since` an earlier revision is refused.
    pub fn follow(view: Arc<View>) -> Arc<Events> {
        let (feed, _) = broadcast::channel(KEPT);
        let mut prev = view.state();
        let events = Arc::new(Events {
            kept: Mutex::new(VecDeque::new()),
            dropped_before: Mutex::new(prev.revision + 1),
            feed,
        });
        let mut updates = view.subscribe();
        let me = events.clone();
        tokio::spawn(async move {
            // What changed between the first look and the subscription.
            let now = view.state();
            if now.revision != prev.revision {
                me.publish(between(&prev, &now, whole(&prev, &now), unix_now()));
                prev = now;
            }
            loop {
                let update = match updates.recv().await {
                    Ok(u) => u,
                    // Missed updates: compare against the newest state as a whole.
                    Err(broadcast::error::RecvError::Lagged(_)) => crate::view::Update {
                        state: view.state(),
                        changed: None,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let next = update.state;
                if next.revision <= prev.revision {
                    continue; // told already, by the comparison above
                }
                let now = unix_now();
                let found = match &update.changed {
                    Some(keys) => between(&prev, &next, keys.iter().map(String::as_str), now),
                    None => between(&prev, &next, whole(&prev, &next), now),
                };
                me.publish(found);
                prev = next;
            }
        });
        events
    }

    fn publish(&self, found: Vec<Event>) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        for e in found {
            if kept.len() == KEPT {
                if let (Some(old), Ok(mut before)) = (kept.pop_front(), self.dropped_before.lock())
                {
                    *before = old.revision + 1;
                }
            }
            kept.push_back(e.clone());
            let _ = self.feed.send(e);
        }
    }

    /// The kept events after revision `since` (0: every one kept) that `filter`
    /// admits, and a receiver of the ones to come (subscribed under the same lock, so
    /// none falls between).
    pub fn since(
        &self,
        since: u64,
        filter: &Filter,
    ) -> Result<(Vec<Event>, broadcast::Receiver<Event>), Gap> {
        let kept = self.kept.lock().map_err(|_| Gap::TooOld(u64::MAX))?;
        let dropped_before = self.dropped_before.lock().map(|b| *b).unwrap_or(0);
        if since != 0 && since + 1 < dropped_before {
            return Err(Gap::TooOld(dropped_before - 1));
        }
        let past = kept
            .iter()
            .filter(|e| e.revision > since && filter.admits(e))
            .cloned()
            .collect();
        Ok((past, self.feed.subscribe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixture::{self, attach, web_on_front};
    use crate::state::{attach_task, detach_task, drain_task, publish_task_health, TaskHealth};

    fn summary(events: &[Event]) -> Vec<(&str, &str, &str)> {
        events
            .iter()
            .map(|e| (e.kind, e.action, e.name.as_str()))
            .collect()
    }

    /// Every change to a task tells its story: created, healthy (its first passing
    /// probe), unhealthy, healthy again, draining, removed; the service and node ride along. A revision that changed
    /// nothing a user sees (the task's status report) tells nothing.
    #[tokio::test]
    async fn a_tasks_life_is_told_in_events() {
        let (_dir, v) = fixture::setup().await;
        web_on_front(&v).await;
        let mut updates = v.subscribe();
        let mut prev = v.state();
        let mut told = vec![];
        let t = attach_task(&v, "n1", attach("web", "/run/netns/a", "n1"))
            .await
            .unwrap();
        fixture::report_up(&v, &[&t.id]).await;
        let healthy = |h| TaskHealth {
            healthy: h,
            since: 1,
            detail: (!h).then(|| "status 503".to_string()),
        };
        for h in [true, false, true] {
            publish_task_health(&v, &v.state(), &t.id, &healthy(h))
                .await
                .unwrap();
        }
        drain_task(&v, &t.id, 30).await.unwrap();
        detach_task(&v, &t.id).await.unwrap();
        let last = v.state().revision;
        while prev.revision < last {
            let u = updates.recv().await.unwrap();
            let keys = u.changed.clone().expect("keys");
            told.extend(between(&prev, &u.state, keys.iter().map(String::as_str), 1));
            prev = u.state;
        }
        let name = t.value.name.as_str();
        assert_eq!(
            summary(&told),
            vec![
                ("task", "create", name),
                ("task", "healthy", name),
                ("task", "unhealthy", name),
                ("task", "healthy", name),
                ("task", "draining", name),
                ("task", "remove", name),
            ]
        );
        assert_eq!(told[0].attributes["service"], "web");
        assert_eq!(told[0].attributes["node"], "n1");
        assert_eq!(told[2].attributes["detail"], "status 503");
        assert!(told.windows(2).all(|w| w[0].revision < w[1].revision));
    }

    /// Compared whole (after the view listed the store again), two states give the
    /// events of everything between them; a filter keeps the kinds named.
    #[tokio::test]
    async fn a_whole_comparison_finds_what_changed_and_filters_keep_their_kind() {
        let (_dir, v) = fixture::setup().await;
        let empty = v.state();
        web_on_front(&v).await;
        let full = v.state();
        let told = between(&empty, &full, whole(&empty, &full), 1);
        let kinds: Vec<(&str, &str)> = told.iter().map(|e| (e.kind, e.action)).collect();
        assert!(kinds.contains(&("network", "create")), "{told:?}");
        assert!(kinds.contains(&("service", "create")), "{told:?}");
        let only = Filter {
            kinds: vec!["service".into()],
        };
        let services: Vec<&Event> = told.iter().filter(|e| only.admits(e)).collect();
        assert_eq!(services.len(), 1, "{told:?}");
        assert_eq!(services[0].name, "web");
        // And back: everything removed.
        let back = between(&full, &empty, full.keys(), 1);
        assert!(back
            .iter()
            .any(|e| (e.kind, e.action) == ("service", "remove")));
    }

    /// A client that asks from a revision still kept gets what followed it; from one
    /// before the oldest kept, a clear refusal naming the oldest.
    #[tokio::test]
    async fn since_serves_what_is_kept_and_refuses_what_is_gone() {
        let (feed, _) = broadcast::channel(16);
        let events = Events {
            kept: Mutex::new(VecDeque::new()),
            dropped_before: Mutex::new(0),
            feed,
        };
        let e = |revision| Event {
            revision,
            time: 0,
            kind: "task",
            action: "create",
            id: format!("t{revision}"),
            name: format!("t{revision}"),
            attributes: BTreeMap::new(),
        };
        events.publish((1..=KEPT as u64 + 5).map(e).collect());
        let all = Filter::default();
        let (past, _) = events.since(KEPT as u64, &all).unwrap();
        assert_eq!(past.len(), 5);
        assert_eq!(past[0].revision, KEPT as u64 + 1);
        // Revisions 1-5 went: from 5 on can be served, and 0 means all that is kept.
        assert_eq!(events.since(2, &all).unwrap_err(), Gap::TooOld(5));
        assert!(events.since(5, &all).is_ok());
        assert_eq!(events.since(0, &all).unwrap().0.len(), KEPT);
    }
}
