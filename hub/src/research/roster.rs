//! The agent profiles ([`crate::agents::Agents`]) as the research engine's [`Roster`]: a
//! step of agent type `t` for owner `o` runs `o`'s enabled profile of `t` (else the default
//! template), with its models resolved from the profile, then `[agents]`, then the gateway.

use futures::future::BoxFuture;
use serde_json::Value;

use super::{Agent, Roster};
use crate::agents::{AGENT_TYPES, Agents, Error};
use crate::store;

/// The types the hub itself gives work to (the plan and the synthesis), not assigned by the
/// coordinator.
const RESERVED: [&str; 2] = ["meta_coordinator", "synthesizer"];

impl Roster for Agents {
    fn agent<'a>(
        &'a self,
        owner: &'a str,
        agent_type: &'a str,
    ) -> BoxFuture<'a, Result<Option<Agent>, store::Error>> {
        Box::pin(async move {
            let profile = match self.resolve(owner, agent_type).await {
                Ok(p) => p,
                Err(Error::Store(e)) => return Err(e),
                Err(e) => {
                    return Err(store::Error::Unreadable {
                        what: format!("agent profile {agent_type} of {owner}"),
                        reason: e.to_string(),
                    });
                }
            };
            Ok(profile.map(|p| {
                let (model, _) = self.models(&p);
                let args = match self.run_args(&p, "", Vec::new()) {
                    Value::Object(mut m) => {
                        m.remove("task");
                        m
                    }
                    _ => serde_json::Map::new(),
                };
                Agent {
                    profile_id: (!p.id.is_empty()).then(|| p.id.clone()),
                    agent_type: p.agent_type.clone(),
                    name: p.display_name.clone(),
                    model,
                    args,
                }
            }))
        })
    }

    fn assignable(&self) -> Vec<String> {
        // The explorer first: the type a model (or the mock) picks when unsure.
        let mut out = vec!["explorer".to_owned()];
        out.extend(
            AGENT_TYPES
                .iter()
                .filter(|t| !RESERVED.contains(t) && **t != "explorer")
                .map(|t| (*t).to_owned()),
        );
        out
    }
}
