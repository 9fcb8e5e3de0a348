//! Which model answers a chat turn (`model_type`, `preferred_model`), and why. Pure: the
//! caller lists what is available now.
//!
//! The rule (documented in the README's "Conversations"):
//! - `preferred_model`, when something serves it;
//! - `local_small`: `chat.local_model` if online, else the smallest node-hosted model online;
//!   none online: the cloud model;
//! - `cloud_large`: `chat.cloud_model`, else the first provider model; none: a local model;
//! - `plugin`: the cloud model (else a local one) with every cluster tool (`server_tools:
//!   "all"`);
//! - `auto_select` (the default): a local model when one is online and the prompt has fewer
//!   than `chat.auto_local_max_tokens` tokens, otherwise the cloud model; when the first choice
//!   is not available, the other.

use serde::{Deserialize, Serialize};

use super::config::ChatConfig;

/// `model_type` of a chat request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// A node-hosted model.
    LocalSmall,
    /// A provider model.
    CloudLarge,
    /// A provider model with the cluster's tools.
    Plugin,
    /// By the rule of the module docs.
    #[default]
    AutoSelect,
}

/// The models available now.
#[derive(Debug, Clone, Default)]
pub struct Available {
    /// Node-hosted models online (`llm.chat@<model>` lanes).
    pub local: Vec<String>,
    /// Provider models and aliases of the gateway.
    pub cloud: Vec<String>,
}

impl Available {
    fn serves(&self, model: &str) -> bool {
        self.local.iter().chain(&self.cloud).any(|m| m == model)
            || model
                .split_once('/')
                .is_some_and(|(_, m)| self.cloud.iter().any(|c| c == m))
    }
}

/// The model chosen, and the one sentence of `reasoning`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The gateway model name to call.
    pub model: String,
    /// Why, in one sentence (the answer's `reasoning`).
    pub reasoning: String,
    /// Whether the turn offers every cluster tool (`plugin`).
    pub all_tools: bool,
    /// Whether the model is node-hosted.
    pub local: bool,
}

/// The parameter count a model name states (`qwen2.5-0.5b` → 0.5e9, `phi-3-mini-128k` →
/// none), for "the smallest online".
fn stated_size(model: &str) -> Option<f64> {
    model
        .split(['-', ':', '_', '/', ' '])
        .filter_map(|part| {
            let p = part.to_ascii_lowercase();
            let (num, mult) = if let Some(n) = p.strip_suffix('b') {
                (n.to_owned(), 1e9)
            } else if let Some(n) = p.strip_suffix('m') {
                (n.to_owned(), 1e6)
            } else {
                return None;
            };
            num.parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0)
                .map(|v| v * mult)
        })
        .next()
}

/// The local model: the configured one when online, else the smallest by stated size (then
/// by name).
fn local_pick(avail: &Available, cfg: &ChatConfig) -> Option<String> {
    if let Some(m) = &cfg.local_model
        && avail.local.contains(m)
    {
        return Some(m.clone());
    }
    let mut all: Vec<&String> = avail.local.iter().collect();
    all.sort_by(|a, b| {
        let (sa, sb) = (stated_size(a), stated_size(b));
        match (sa, sb) {
            (Some(x), Some(y)) => x.total_cmp(&y).then_with(|| a.cmp(b)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.cmp(b),
        }
    });
    all.first().map(|m| (*m).clone())
}

fn cloud_pick(avail: &Available, cfg: &ChatConfig) -> Option<String> {
    if let Some(m) = &cfg.cloud_model
        && avail.serves(m)
    {
        return Some(m.clone());
    }
    avail.cloud.first().cloned()
}

/// Chooses the model of a turn whose prompt has `prompt_tokens` tokens. `None` when nothing
/// can answer (no provider and no node-hosted model).
pub fn choose(
    model_type: ModelType,
    preferred: Option<&str>,
    prompt_tokens: u64,
    avail: &Available,
    cfg: &ChatConfig,
) -> Option<Choice> {
    let mut note = String::new();
    if let Some(p) = preferred.filter(|p| !p.is_empty()) {
        if avail.serves(p) {
            return Some(Choice {
                model: p.to_owned(),
                reasoning: format!("preferred model {p} is served"),
                all_tools: model_type == ModelType::Plugin,
                local: avail.local.iter().any(|m| m == p),
            });
        }
        note = format!("preferred model {p} is not served; ");
    }
    let local = local_pick(avail, cfg);
    let cloud = cloud_pick(avail, cfg);
    let pick = |model: String, local: bool, why: String, all_tools: bool| Choice {
        model,
        reasoning: format!("{note}{why}"),
        all_tools,
        local,
    };
    match model_type {
        ModelType::LocalSmall => match (local, cloud) {
            (Some(l), _) => Some(pick(l, true, "local model online".to_owned(), false)),
            (None, Some(c)) => Some(pick(
                c,
                false,
                "no local model online, so the cloud model".to_owned(),
                false,
            )),
            (None, None) => None,
        },
        ModelType::CloudLarge | ModelType::Plugin => {
            let plugin = model_type == ModelType::Plugin;
            let what = if plugin {
                "plugin mode: the cloud model with the cluster's tools"
            } else {
                "cloud model requested"
            };
            match (cloud, local) {
                (Some(c), _) => Some(pick(c, false, what.to_owned(), plugin)),
                (None, Some(l)) => Some(pick(
                    l,
                    true,
                    "no cloud model configured, so a local model".to_owned(),
                    plugin,
                )),
                (None, None) => None,
            }
        }
        ModelType::AutoSelect => {
            let short = prompt_tokens < cfg.auto_local_max_tokens;
            let local_why = format!("local model online, short prompt ({prompt_tokens} tokens)");
            let cloud_why = format!(
                "long prompt ({prompt_tokens} tokens, auto_local_max_tokens {}), so the cloud model",
                cfg.auto_local_max_tokens
            );
            match (local, cloud) {
                (Some(l), Some(_)) if short => Some(pick(l, true, local_why, false)),
                (Some(_), Some(c)) => Some(pick(c, false, cloud_why, false)),
                (Some(l), None) => Some(pick(
                    l,
                    true,
                    "no cloud model configured, so a local model".to_owned(),
                    false,
                )),
                (None, Some(c)) => Some(pick(
                    c,
                    false,
                    "no local model online, so the cloud model".to_owned(),
                    false,
                )),
                (None, None) => None,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn avail(local: &[&str], cloud: &[&str]) -> Available {
        Available {
            local: local.iter().map(|s| (*s).to_owned()).collect(),
            cloud: cloud.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn each_model_type_picks_as_documented() {
        let cfg = ChatConfig::default();
        let both = avail(&["llama3.2:3b", "qwen2.5-0.5b"], &["gpt-4o-mini"]);
        let c = choose(ModelType::LocalSmall, None, 10, &both, &cfg).unwrap();
        assert_eq!(c.model, "qwen2.5-0.5b", "the smallest online");
        assert!(c.local);
        let c = choose(ModelType::CloudLarge, None, 10, &both, &cfg).unwrap();
        assert_eq!(c.model, "gpt-4o-mini");
        let c = choose(ModelType::Plugin, None, 10, &both, &cfg).unwrap();
        assert!(c.all_tools && !c.local);
        let c = choose(ModelType::AutoSelect, None, 10, &both, &cfg).unwrap();
        assert_eq!(c.reasoning, "local model online, short prompt (10 tokens)");
        let c = choose(ModelType::AutoSelect, None, 5000, &both, &cfg).unwrap();
        assert_eq!(c.model, "gpt-4o-mini");
        assert!(c.reasoning.starts_with("long prompt"));
    }

    #[test]
    fn falls_back_when_the_first_choice_is_missing() {
        let cfg = ChatConfig::default();
        let cloud_only = avail(&[], &["mock-1"]);
        let c = choose(ModelType::LocalSmall, None, 10, &cloud_only, &cfg).unwrap();
        assert_eq!(c.model, "mock-1");
        assert_eq!(c.reasoning, "no local model online, so the cloud model");
        let c = choose(ModelType::AutoSelect, None, 10, &cloud_only, &cfg).unwrap();
        assert_eq!(c.model, "mock-1");
        let local_only = avail(&["tiny"], &[]);
        let c = choose(ModelType::AutoSelect, None, 99_999, &local_only, &cfg).unwrap();
        assert_eq!(c.model, "tiny");
        assert!(choose(ModelType::AutoSelect, None, 1, &avail(&[], &[]), &cfg).is_none());
    }

    #[test]
    fn preferred_and_configured_models_win() {
        let cfg = ChatConfig {
            local_model: Some("big-70b".to_owned()),
            cloud_model: Some("gpt-4.1".to_owned()),
            ..ChatConfig::default()
        };
        let a = avail(&["big-70b", "small-1b"], &["gpt-4o-mini", "gpt-4.1"]);
        assert_eq!(
            choose(ModelType::LocalSmall, None, 1, &a, &cfg)
                .unwrap()
                .model,
            "big-70b"
        );
        assert_eq!(
            choose(ModelType::CloudLarge, None, 1, &a, &cfg)
                .unwrap()
                .model,
            "gpt-4.1"
        );
        let c = choose(ModelType::AutoSelect, Some("gpt-4o-mini"), 1, &a, &cfg).unwrap();
        assert_eq!(c.reasoning, "preferred model gpt-4o-mini is served");
        let c = choose(ModelType::CloudLarge, Some("nope"), 1, &a, &cfg).unwrap();
        assert_eq!(
            c.reasoning,
            "preferred model nope is not served; cloud model requested"
        );
    }
}
