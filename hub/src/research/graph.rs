//! The dependency graph of a research run (pure: no I/O, no clock).
//!
//! The coordinator's plan lists research tasks, each naming the tasks it depends on (by `id`,
//! or by 0-based position in the list, since models do both). [`Graph::build`] turns that into
//! a DAG and its **execution groups**: group 0 holds the tasks with no dependency, group `g`
//! those whose deepest dependency is in group `g - 1`; a group's tasks run in parallel, groups
//! in order.
//!
//! A plan is repaired rather than trusted, so a run never hangs on it, and every repair is
//! reported (the `decomposition_complete` message names them):
//! - a dependency on an unknown id, or on the task itself, is dropped;
//! - duplicate ids get a `-2`, `-3`, … suffix (a later task's dependency on the id means the
//!   first one); empty ids become `t<position>`;
//! - a cycle is broken by dropping, of the tasks still unplaced, the dependencies of the one
//!   listed first on tasks that are also unplaced (Kahn's algorithm resumed from there).
//!
//! A plan with no task, or more than [`MAX_TASKS`], is rejected ([`GraphError`]).

use std::collections::HashMap;

/// Most research tasks one plan may hold.
pub const MAX_TASKS: usize = 20_000;

/// One task of a plan, as the coordinator wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    /// Its id in the plan (may be empty or repeated: repaired).
    pub id: String,
    /// Dependencies: ids of other tasks, or positions (`"0"`, `"2"`) in the plan.
    pub dependencies: Vec<String>,
}

/// The built graph: tasks in plan order with their repaired ids and dependencies (as indexes),
/// and the execution groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// Task ids after repair, in plan order (unique, non-empty).
    pub ids: Vec<String>,
    /// For each task, the indexes of the tasks it depends on (sorted, no duplicates).
    pub deps: Vec<Vec<usize>>,
    /// For each task, its execution group.
    pub group_of: Vec<usize>,
    /// The groups, each listing task indexes in plan order.
    pub groups: Vec<Vec<usize>>,
    /// What was repaired, for people (empty when the plan was sound).
    pub repairs: Vec<String>,
}

/// Why a plan cannot become a graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// The plan holds no task.
    #[error("the plan holds no research task")]
    Empty,
    /// The plan holds more than [`MAX_TASKS`] tasks.
    #[error("the plan holds {0} research tasks, more than the {MAX_TASKS} allowed")]
    TooLarge(usize),
}

impl Graph {
    /// Builds the graph of `plan`, repairing it as the module docs describe. O(tasks +
    /// dependencies) apart from cycle breaking.
    ///
    /// # Errors
    /// [`GraphError::Empty`], [`GraphError::TooLarge`].
    pub fn build(plan: &[PlannedTask]) -> Result<Graph, GraphError> {
        if plan.is_empty() {
            return Err(GraphError::Empty);
        }
        if plan.len() > MAX_TASKS {
            return Err(GraphError::TooLarge(plan.len()));
        }
        let mut repairs = Vec::new();
        let mut ids: Vec<String> = Vec::with_capacity(plan.len());
        let mut index: HashMap<String, usize> = HashMap::with_capacity(plan.len());
        for (i, t) in plan.iter().enumerate() {
            let base = match t.id.trim() {
                "" => format!("t{i}"),
                s => s.to_owned(),
            };
            let mut id = base.clone();
            let mut n = 1;
            while index.contains_key(&id) {
                n += 1;
                id = format!("{base}-{n}");
            }
            if id != t.id {
                repairs.push(format!("task {i} renamed `{id}`"));
            }
            index.insert(id.clone(), i);
            // The plan's own id also finds the first task that had it.
            index.entry(t.id.clone()).or_insert(i);
            ids.push(id);
        }
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(plan.len());
        for (i, t) in plan.iter().enumerate() {
            let mut d = Vec::with_capacity(t.dependencies.len());
            for dep in &t.dependencies {
                let dep = dep.trim();
                let found = index
                    .get(dep)
                    .copied()
                    .or_else(|| dep.parse::<usize>().ok().filter(|p| *p < plan.len()));
                match found {
                    Some(j) if j == i => repairs.push(format!("`{}` depended on itself", ids[i])),
                    Some(j) => d.push(j),
                    None => repairs.push(format!(
                        "`{}` depended on unknown `{dep}` (dropped)",
                        ids[i]
                    )),
                }
            }
            d.sort_unstable();
            d.dedup();
            deps.push(d);
        }
        let group_of = levels(&mut deps, &ids, &mut repairs);
        let n_groups = group_of.iter().max().map_or(0, |g| g + 1);
        let mut groups = vec![Vec::new(); n_groups];
        for (i, g) in group_of.iter().enumerate() {
            groups[*g].push(i);
        }
        Ok(Graph {
            ids,
            deps,
            group_of,
            groups,
            repairs,
        })
    }

    /// The number of tasks.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the graph has no task (never true for a built graph).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Kahn's algorithm: each task's group (its longest dependency chain), breaking cycles as the
/// module docs say (which edits `deps`).
fn levels(deps: &mut [Vec<usize>], ids: &[String], repairs: &mut Vec<String>) -> Vec<usize> {
    let n = deps.len();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting: Vec<usize> = vec![0; n];
    for (i, d) in deps.iter().enumerate() {
        waiting[i] = d.len();
        for &j in d {
            dependants[j].push(i);
        }
    }
    let mut group = vec![0usize; n];
    let mut placed = vec![false; n];
    let mut ready: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut done = 0;
    let mut next_unplaced = 0;
    loop {
        while let Some(i) = ready.pop_front() {
            placed[i] = true;
            done += 1;
            group[i] = deps[i].iter().map(|&j| group[j] + 1).max().unwrap_or(0);
            for &k in &dependants[i] {
                waiting[k] -= 1;
                if waiting[k] == 0 {
                    ready.push_back(k);
                }
            }
        }
        if done == n {
            return group;
        }
        // A cycle: the first unplaced task loses its dependencies on unplaced tasks.
        while placed[next_unplaced] {
            next_unplaced += 1;
        }
        let i = next_unplaced;
        let (keep, cut): (Vec<usize>, Vec<usize>) = deps[i].iter().partition(|&&j| placed[j]);
        for j in &cut {
            dependants[*j].retain(|&k| k != i);
        }
        repairs.push(format!(
            "cycle broken: `{}` no longer depends on {}",
            ids[i],
            cut.iter()
                .map(|&j| format!("`{}`", ids[j]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        deps[i] = keep;
        waiting[i] = 0;
        ready.push_back(i);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plan(spec: &[(&str, &[&str])]) -> Vec<PlannedTask> {
        spec.iter()
            .map(|(id, deps)| PlannedTask {
                id: (*id).to_owned(),
                dependencies: deps.iter().map(|d| (*d).to_owned()).collect(),
            })
            .collect()
    }

    #[test]
    fn groups_are_the_longest_dependency_chains() {
        let g = Graph::build(&plan(&[
            ("a", &[]),
            ("b", &["a"]),
            ("c", &["a"]),
            ("d", &["b", "c"]),
            ("e", &[]),
        ]))
        .unwrap();
        assert_eq!(g.groups, vec![vec![0, 4], vec![1, 2], vec![3]]);
        assert_eq!(g.group_of, vec![0, 1, 1, 2, 0]);
        assert!(g.repairs.is_empty());
    }

    #[test]
    fn positions_unknown_ids_self_and_duplicates_are_repaired() {
        let g = Graph::build(&plan(&[
            ("x", &["0", "nope"]),
            ("x", &["0"]),
            ("", &["x", "1", "1"]),
        ]))
        .unwrap();
        assert_eq!(g.ids, vec!["x", "x-2", "t2"]);
        assert_eq!(g.deps, vec![vec![], vec![0], vec![0, 1]]);
        assert_eq!(g.groups, vec![vec![0], vec![1], vec![2]]);
        assert_eq!(g.repairs.len(), 4, "{:?}", g.repairs);
    }

    #[test]
    fn a_cycle_is_broken_not_a_hang() {
        let g = Graph::build(&plan(&[
            ("a", &["c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("d", &[]),
        ]))
        .unwrap();
        assert_eq!(g.deps[0], Vec::<usize>::new());
        assert_eq!(g.group_of, vec![0, 1, 2, 0]);
        assert!(g.repairs[0].contains("cycle broken"), "{:?}", g.repairs);
        // Every dependency points to an earlier group.
        for (i, d) in g.deps.iter().enumerate() {
            assert!(d.iter().all(|&j| g.group_of[j] < g.group_of[i]));
        }
    }

    #[test]
    fn empty_and_oversized_plans_are_rejected() {
        assert_eq!(Graph::build(&[]), Err(GraphError::Empty));
        let big = vec![
            PlannedTask {
                id: String::new(),
                dependencies: vec![]
            };
            MAX_TASKS + 1
        ];
        assert_eq!(Graph::build(&big), Err(GraphError::TooLarge(MAX_TASKS + 1)));
    }

    #[test]
    fn random_plans_always_give_a_dag_in_groups() {
        let mut s: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for _ in 0..200 {
            let n = 1 + next(40) as usize;
            let p: Vec<PlannedTask> = (0..n)
                .map(|_| PlannedTask {
                    id: format!("t{}", next(n as u64 + 2)),
                    dependencies: (0..next(4))
                        .map(|_| {
                            if next(2) == 0 {
                                next(n as u64).to_string()
                            } else {
                                format!("t{}", next(n as u64 + 2))
                            }
                        })
                        .collect(),
                })
                .collect();
            let g = Graph::build(&p).unwrap();
            assert_eq!(g.len(), n);
            assert_eq!(g.groups.iter().map(Vec::len).sum::<usize>(), n);
            for (i, d) in g.deps.iter().enumerate() {
                assert!(d.iter().all(|&j| g.group_of[j] < g.group_of[i]));
            }
            let unique: std::collections::HashSet<&String> = g.ids.iter().collect();
            assert_eq!(unique.len(), n);
        }
    }

    #[test]
    fn a_ten_thousand_task_plan_builds() {
        let p: Vec<PlannedTask> = (0..10_000)
            .map(|i| PlannedTask {
                id: format!("t{i}"),
                dependencies: if i < 100 {
                    vec![]
                } else {
                    vec![format!("t{}", i % 100), format!("t{}", i - 1)]
                },
            })
            .collect();
        let g = Graph::build(&p).unwrap();
        assert_eq!(g.len(), 10_000);
        assert_eq!(g.groups[0].len(), 100);
    }
}
