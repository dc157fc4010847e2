//! Pure: a lock graph as the trees a person reads during an incident, for
//! the page, `lockjam tree` and the snapshot JSON. Each tree starts at a
//! waiter whose wait leads straight to root blockers (the queue head, or a
//! victim holding a row), lists those roots above it, and the sessions
//! behind it below, nested by whom each waits on. Many alike sessions
//! behind one node (same query, application, user, state and mode) are
//! grouped: "183 × SELECT ... from web".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::analysis::{BlockKind, LockGraph, Waiter};
use crate::policy::Policy;
use crate::state::LastSample;
use crate::view::{seconds, SessionView};

/// Alike leaves behind one node are grouped from this many on.
const GROUP_FROM: usize = 3;
/// Sessions listed one by one behind one node, at most; the others are
/// folded into one group, so that a queue of 10,000 stays a small page.
const MAX_LISTED: usize = 20;
/// Pids a group names, at most.
const GROUP_PIDS: usize = 10;
/// Groups behind one node, at most; the others join "more sessions".
const MAX_GROUPS: usize = 20;
/// Levels of nesting, at most: deeper sessions are counted in one group,
/// so that no chain, however long, makes a deep document (or a deep
/// recursion drawing it).
const MAX_NESTING: usize = 32;

/// One lock queue: who holds it up, who waits first, who waits behind.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tree {
    pub datname: String,
    /// The relation the top waiter asks for, or `(transactionid)` and the
    /// like for a wait on a row's transaction.
    pub relation: String,
    pub locktype: String,
    pub mode: String,
    /// Sessions that block the top waiter, directly or through others, and
    /// wait on no one: the only sessions whose end frees the queue.
    pub roots: Vec<Root>,
    /// The top waiter and, nested, everyone behind it.
    pub waiter: Node,
    /// Sessions waiting in this tree.
    pub blocked: u64,
    /// Wait edges in its longest chain.
    pub depth: u32,
    /// No root: the sessions wait on each other, and PostgreSQL's deadlock
    /// detector ends one of them after `deadlock_timeout`.
    pub deadlock: bool,
    /// What the policy does next about a wait in this tree, if anything.
    pub next: Option<NextAction>,
}

/// A root blocker and the lock it holds against the tree's top waiter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Root {
    #[serde(flatten)]
    pub session: SessionView,
    pub holds: Option<String>,
    /// What that lock is on: a relation, or `(transactionid)` for a row's
    /// transaction.
    pub holds_on: Option<String>,
}

/// A waiting session and the sessions behind it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    #[serde(flatten)]
    pub session: SessionView,
    pub relation: String,
    pub mode: String,
    pub wait_seconds: f64,
    /// Sessions waiting behind it, directly or transitively.
    pub behind: u64,
    /// Others it waits on, besides the node it is listed under.
    pub also_waits_on: Vec<i32>,
    pub children: Vec<Child>,
}

/// What waits behind a node: a session, or alike sessions counted.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Child {
    Session(Box<Node>),
    Group(Group),
}

/// Alike sessions behind one node, none with anyone behind it. `query` is
/// `None` for the group of the sessions past [`MAX_LISTED`] that have
/// nothing else in common.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub count: u64,
    pub query: Option<String>,
    pub application_name: Option<String>,
    pub usename: Option<String>,
    pub state: Option<String>,
    pub mode: Option<String>,
    pub wait_seconds_max: f64,
    pub wait_seconds_min: f64,
    /// The first pids, ascending.
    pub pids: Vec<i32>,
}

/// The earliest rule that concerns a wait in the tree, and when it acts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NextAction {
    pub rule: String,
    pub action: &'static str,
    /// The waiter whose wait brings it due.
    pub waiter_pid: i32,
    /// Seconds from the sample until it is due; 0 once due.
    pub due_in_seconds: f64,
    pub dry_run: bool,
    /// Why it will not signal, when every session it would signal is
    /// protected (or no client's): it reports, and the queue stays.
    pub withheld: Option<String>,
}

/// The graph's trees, the largest first. `policy` (when on) adds what it
/// does next to each tree.
pub fn build(graph: &LockGraph, policy: Option<&Policy>) -> Vec<Tree> {
    let waiters: HashMap<i32, &Waiter> = graph.waiters.iter().map(|w| (w.session.pid, w)).collect();
    // Each waiter is listed under a waiter it waits on, else it tops a
    // tree: under the deepest one that holds what it wants (a victim it
    // waits behind for a row or a table), else under the first in line of
    // the queue it joined (a waiter that only queues behind others asks
    // for the same object: its queue's sessions are siblings, not a
    // staircase one level per session).
    let parent = |w: &Waiter| -> Option<i32> {
        let ahead = |kind: BlockKind| {
            w.blocked_by
                .iter()
                .filter(move |b| b.kind == kind && b.pid != w.session.pid)
                .filter_map(|b| waiters.get(&b.pid))
        };
        ahead(BlockKind::Hard)
            .max_by(|a, b| {
                a.chain_depth
                    .cmp(&b.chain_depth)
                    .then(b.session.pid.cmp(&a.session.pid))
            })
            .or_else(|| {
                ahead(BlockKind::Soft).min_by(|a, b| {
                    a.chain_depth
                        .cmp(&b.chain_depth)
                        .then(a.session.pid.cmp(&b.session.pid))
                })
            })
            .map(|p| p.session.pid)
    };
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let mut parents: HashMap<i32, i32> = HashMap::new();
    let mut tops = Vec::new();
    for waiter in &graph.waiters {
        match parent(waiter) {
            Some(p) => {
                children.entry(p).or_default().push(waiter.session.pid);
                parents.insert(waiter.session.pid, p);
            }
            None => tops.push(waiter.session.pid),
        }
    }
    let mut placed = HashSet::new();
    let forest = Forest {
        graph,
        waiters: &waiters,
        children: &children,
    };
    let mut trees: Vec<Tree> = tops
        .iter()
        .map(|&pid| tree(&forest, pid, false, &mut placed, policy))
        .collect();
    // Waiters left over wait on each other in a cycle, or behind one:
    // each cycle is one tree, from its lowest pid, with those behind it.
    for waiter in &graph.waiters {
        if placed.contains(&waiter.session.pid) {
            continue;
        }
        let mut path = vec![waiter.session.pid];
        let mut seen = HashSet::from([waiter.session.pid]);
        while let Some(&up) = path.last().and_then(|pid| parents.get(pid)) {
            if !seen.insert(up) {
                let from = path.iter().position(|pid| *pid == up).unwrap_or(0);
                path.drain(..from);
                break;
            }
            path.push(up);
        }
        let start = path.iter().copied().min().unwrap_or(waiter.session.pid);
        trees.push(tree(&forest, start, true, &mut placed, policy));
    }
    trees.sort_by(|a, b| {
        b.blocked
            .cmp(&a.blocked)
            .then(b.waiter.wait_seconds.total_cmp(&a.waiter.wait_seconds))
            .then(a.waiter.session.pid.cmp(&b.waiter.session.pid))
    });
    trees
}

/// What every tree of a graph is cut from: the waiters, and who is listed
/// under whom.
struct Forest<'a> {
    graph: &'a LockGraph,
    waiters: &'a HashMap<i32, &'a Waiter>,
    children: &'a BTreeMap<i32, Vec<i32>>,
}

fn tree(forest: &Forest, top: i32, cycle: bool, placed: &mut HashSet<i32>, policy: Option<&Policy>) -> Tree {
    let (graph, waiters) = (forest.graph, forest.waiters);
    let first = waiters[&top];
    let mut members = Vec::new();
    let node = node(forest, top, None, 0, placed, &mut members);
    let wait_tree = graph.wait_tree(top);
    let roots: Vec<Root> = if cycle {
        Vec::new()
    } else {
        wait_tree
            .roots
            .iter()
            .map(|&pid| {
                let blocker = graph.blocker(pid);
                Root {
                    session: SessionView::of(pid, blocker.and_then(|b| b.session.as_ref()), graph.taken_at),
                    holds: blocker
                        .and_then(|b| b.lock_held_against(&first.lock))
                        .map(|l| l.mode.clone()),
                    holds_on: blocker
                        .and_then(|b| b.lock_held_against(&first.lock))
                        .map(|l| l.relation_label()),
                }
            })
            .collect()
    };
    // PostgreSQL ends a deadlock itself; the policy leaves it alone.
    let next = policy
        .filter(|p| p.enabled && !(cycle || wait_tree.deadlock))
        .and_then(|p| next_action(graph, p, members.iter().map(|pid| waiters[pid])));
    Tree {
        datname: first.datname().to_string(),
        relation: first.lock.relation_label(),
        locktype: first.lock.locktype.clone(),
        mode: first.lock.mode.clone(),
        deadlock: cycle || wait_tree.deadlock,
        roots,
        blocked: members.len() as u64,
        depth: members.iter().map(|pid| waiters[pid].chain_depth).max().unwrap_or(0),
        waiter: node,
        next,
    }
}

fn node(
    forest: &Forest,
    pid: i32,
    listed_under: Option<i32>,
    nesting: usize,
    placed: &mut HashSet<i32>,
    members: &mut Vec<i32>,
) -> Node {
    let (graph, waiters, children) = (forest.graph, forest.waiters, forest.children);
    placed.insert(pid);
    members.push(pid);
    let waiter = waiters[&pid];
    let mut behind = Vec::new();
    let mut deeper = None;
    if nesting + 1 >= MAX_NESTING {
        deeper = folded_below(pid, waiters, children, placed, members);
    } else {
        for &child in children.get(&pid).into_iter().flatten() {
            // In a cycle, a child may already be listed higher up.
            if !placed.contains(&child) {
                behind.push(node(forest, child, Some(pid), nesting + 1, placed, members));
            }
        }
    }
    behind.sort_by(|a, b| {
        b.wait_seconds
            .total_cmp(&a.wait_seconds)
            .then(a.session.pid.cmp(&b.session.pid))
    });
    Node {
        session: SessionView::of(pid, Some(&waiter.session), graph.taken_at),
        relation: waiter.lock.relation_label(),
        mode: waiter.lock.mode.clone(),
        wait_seconds: seconds(waiter.wait),
        behind: waiter.behind,
        also_waits_on: waiter
            .blocked_by
            .iter()
            .map(|b| b.pid)
            .filter(|&p| Some(p) != listed_under)
            .collect(),
        children: group(behind).into_iter().chain(deeper.map(Child::Group)).collect(),
    }
}

/// Everyone below `pid`, counted in one group, walked without recursion.
fn folded_below(
    pid: i32,
    waiters: &HashMap<i32, &Waiter>,
    children: &BTreeMap<i32, Vec<i32>>,
    placed: &mut HashSet<i32>,
    members: &mut Vec<i32>,
) -> Option<Group> {
    let mut stack: Vec<i32> = children.get(&pid).cloned().unwrap_or_default();
    let mut found: Vec<(i32, f64)> = Vec::new();
    while let Some(next) = stack.pop() {
        if !placed.insert(next) {
            continue;
        }
        members.push(next);
        found.push((next, seconds(waiters[&next].wait)));
        stack.extend(children.get(&next).into_iter().flatten().copied());
    }
    (!found.is_empty()).then(|| counted(found.len() as u64, found))
}

/// A group of `count` sessions with nothing in common named: the first
/// pids of `seen` and the range of their waits.
fn counted(count: u64, seen: Vec<(i32, f64)>) -> Group {
    let mut pids: Vec<i32> = seen.iter().map(|(pid, _)| *pid).collect();
    pids.sort_unstable();
    pids.truncate(GROUP_PIDS);
    Group {
        count,
        query: None,
        application_name: None,
        usename: None,
        state: None,
        mode: None,
        wait_seconds_max: seen.iter().map(|(_, w)| *w).fold(0.0, f64::max),
        wait_seconds_min: seen.iter().map(|(_, w)| *w).fold(f64::INFINITY, f64::min),
        pids,
    }
}

/// Sessions in a node and below it.
fn sessions_in(node: &Node) -> u64 {
    1 + node
        .children
        .iter()
        .map(|child| match child {
            Child::Session(n) => sessions_in(n),
            Child::Group(g) => g.count,
        })
        .sum::<u64>()
}

/// Alike leaves grouped, the rest listed, oldest wait first; past
/// [`MAX_LISTED`] listed, the rest folded into one group.
fn group(nodes: Vec<Node>) -> Vec<Child> {
    type Key = (Option<String>, Option<String>, Option<String>, Option<String>, String);
    let key = |n: &Node| -> Key {
        (
            n.session.query.clone(),
            n.session.application_name.clone(),
            n.session.usename.clone(),
            n.session.state.clone(),
            n.mode.clone(),
        )
    };
    let mut alike: HashMap<Key, usize> = HashMap::new();
    for n in nodes.iter().filter(|n| n.children.is_empty()) {
        *alike.entry(key(n)).or_default() += 1;
    }
    let mut groups: Vec<(Key, Vec<Node>)> = Vec::new();
    let mut listed = Vec::new();
    for n in nodes {
        let k = key(&n);
        if n.children.is_empty() && alike[&k] >= GROUP_FROM {
            match groups.iter_mut().find(|(gk, _)| *gk == k) {
                Some((_, members)) => members.push(n),
                None => groups.push((k, vec![n])),
            }
        } else {
            listed.push(n);
        }
    }
    let mut out: Vec<Child> = Vec::new();
    let mut groups: Vec<Group> = groups
        .into_iter()
        .map(|((query, application_name, usename, state, mode), members)| Group {
            query,
            application_name,
            usename,
            state,
            mode: Some(mode),
            ..summary(&members)
        })
        .collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.wait_seconds_max.total_cmp(&a.wait_seconds_max))
    });
    let folded = if listed.len() > MAX_LISTED {
        listed.split_off(MAX_LISTED)
    } else {
        Vec::new()
    };
    let folded_groups = if groups.len() > MAX_GROUPS {
        groups.split_off(MAX_GROUPS)
    } else {
        Vec::new()
    };
    out.extend(listed.into_iter().map(|n| Child::Session(Box::new(n))));
    out.extend(groups.into_iter().map(Child::Group));
    if !folded.is_empty() || !folded_groups.is_empty() {
        let mut more = summary(&folded);
        for g in folded_groups {
            more.count += g.count;
            more.pids.extend(g.pids);
            more.wait_seconds_max = more.wait_seconds_max.max(g.wait_seconds_max);
            more.wait_seconds_min = more.wait_seconds_min.min(g.wait_seconds_min);
        }
        more.pids.sort_unstable();
        more.pids.truncate(GROUP_PIDS);
        out.push(Child::Group(more));
    }
    out
}

/// A group of `members` with nothing but their count (each with the
/// sessions below it), waits and pids.
fn summary(members: &[Node]) -> Group {
    counted(
        members.iter().map(sessions_in).sum(),
        members.iter().map(|n| (n.session.pid, n.wait_seconds)).collect(),
    )
}

/// The earliest rule due for one of `waiters` that would signal someone,
/// else the earliest that would not (every session it would signal
/// protected), with why. The policy also holds to
/// `max_actions_per_minute`, which this does not foresee.
fn next_action<'a>(
    graph: &LockGraph,
    policy: &Policy,
    waiters: impl Iterator<Item = &'a Waiter>,
) -> Option<NextAction> {
    let mut best: Option<(bool, SystemTime, NextAction)> = None;
    for waiter in waiters {
        for rule in policy.rules.iter().filter(|r| r.on_standby || !graph.in_recovery) {
            if !rule.concerns(waiter) || waiter.behind < rule.min_queue {
                continue;
            }
            let withheld = withheld(graph, policy, rule, waiter);
            let due = graph.taken_at + rule.min_wait.saturating_sub(waiter.wait);
            let better = match &best {
                None => true,
                Some((held, at, _)) => (withheld.is_some(), due) < (*held, *at),
            };
            if better {
                best = Some((
                    withheld.is_some(),
                    due,
                    NextAction {
                        rule: rule.name.clone(),
                        action: rule.action.as_str(),
                        waiter_pid: waiter.session.pid,
                        due_in_seconds: seconds(rule.min_wait.saturating_sub(waiter.wait)),
                        dry_run: policy.dry_run,
                        withheld,
                    },
                ));
            }
        }
    }
    best.map(|(_, _, next)| next)
}

/// Why `rule` would signal no one for `waiter`: the reason of its first
/// protected target, when every one is (its roots, or the waiter itself
/// for `cancel_waiter`).
fn withheld(graph: &LockGraph, policy: &Policy, rule: &crate::policy::Rule, waiter: &Waiter) -> Option<String> {
    let targets: Vec<Option<&crate::snapshot::Session>> = match rule.action {
        crate::policy::Action::CancelWaiter => vec![Some(&waiter.session)],
        _ => graph
            .wait_tree(waiter.session.pid)
            .roots
            .iter()
            .map(|pid| graph.blocker(*pid).and_then(|b| b.session.as_ref()))
            .collect(),
    };
    let reasons: Vec<Option<String>> = targets
        .iter()
        .map(|session| match session {
            None => Some("a prepared transaction, which has no session to signal".into()),
            Some(session) => crate::policy::protection(session, &graph.own_pids, policy, rule),
        })
        .collect();
    if reasons.is_empty() || reasons.iter().any(Option::is_none) {
        return None;
    }
    reasons.into_iter().flatten().next()
}

/// Terminal colours, or none.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\u{1b}[{code}m{text}\u{1b}[0m")
        } else {
            text.to_string()
        }
    }
}

/// Query texts cut to this many characters on a terminal line.
const QUERY_WIDTH: usize = 100;

/// A value from the database as it may be printed to a terminal: control
/// characters (an escape sequence in a query or a name) written as
/// `\u{..}`, so that nothing a session sends can move the cursor or
/// recolour the screen.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if unprintable(c) {
            if c == '\n' || c == '\t' || c == '\r' {
                out.push(' ');
            } else {
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn cut(text: &str, width: usize) -> String {
    let text = printable(text.trim());
    match text.char_indices().nth(width) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn opt(value: &Option<String>) -> String {
    printable(value.as_deref().unwrap_or("?"))
}

fn who(s: &SessionView) -> String {
    let mut who = format!("{}@{}", opt(&s.usename), opt(&s.datname));
    if let Some(app) = s.application_name.as_deref().filter(|a| !a.is_empty()) {
        let _ = write!(who, " {}", printable(app));
    }
    if let Some(client) = &s.client_addr {
        let _ = write!(who, " from {}", printable(client));
    }
    who
}

/// What a root of pid 0 is, and what to do: PostgreSQL names every
/// prepared transaction that blocks pid 0, and it has no session to
/// cancel.
pub const PREPARED_ROOT: &str = "pid 0: a prepared transaction, with no session to cancel; \
`lockjam preflight --relation` or pg_prepared_xacts names it, and COMMIT PREPARED or ROLLBACK PREPARED ends it";

/// Whether `printable` rewrites `c`: control characters, line and
/// paragraph separators, and the invisible format characters that reorder
/// or hide text (bidirectional overrides and isolates, zero-width
/// characters, the byte order mark).
pub fn unprintable(c: char) -> bool {
    let invisible = matches!(
        c,
        '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}' | '\u{feff}'
    );
    c.is_control() || invisible
}

/// The trees as `lockjam tree` prints them.
pub fn render(trees: &[Tree], style: Style) -> String {
    let mut out = String::new();
    for t in trees {
        let _ = writeln!(
            out,
            "  database {} · {} · {} wanted · {} blocked, chain depth {}",
            style.paint("1", &printable(&t.datname)),
            style.paint("1", &printable(&t.relation)),
            printable(&t.mode),
            t.blocked,
            t.depth
        );
        if t.deadlock {
            let _ = writeln!(
                out,
                "    {} these sessions wait on each other; PostgreSQL ends one after deadlock_timeout",
                style.paint("31", "DEADLOCK")
            );
        }
        for root in &t.roots {
            let s = &root.session;
            if s.pid == 0 {
                let _ = writeln!(out, "    {} {PREPARED_ROOT}", style.paint("1;31", "ROOT"));
                continue;
            }
            let _ = writeln!(
                out,
                "    {} pid {} {} · {} · holds {} · transaction {}",
                style.paint("1;31", "ROOT"),
                s.pid,
                who(s),
                state(s),
                match (&root.holds, &root.holds_on) {
                    (Some(mode), Some(on)) => format!("{} on {}", printable(mode), printable(on)),
                    _ => "?".into(),
                },
                age(s.transaction_age_seconds),
            );
            if let Some(query) = &s.query {
                let _ = writeln!(out, "         {}", style.paint("2", &cut(query, QUERY_WIDTH)));
            }
        }
        render_node(&mut out, &t.waiter, "    ", style);
        if let Some(next) = &t.next {
            let when = if next.due_in_seconds > 0.0 {
                format!("in {:.1}s", next.due_in_seconds)
            } else {
                "now".to_string()
            };
            let _ = writeln!(
                out,
                "    {} rule `{}` {}{} (pid {}'s wait) {when}{}",
                style.paint("36", "POLICY"),
                printable(&next.rule),
                next.action,
                if next.dry_run { " (dry run: logs only)" } else { "" },
                next.waiter_pid,
                match &next.withheld {
                    Some(why) => format!(": withheld, {}; it reports and the queue stays", printable(why)),
                    None => String::new(),
                }
            );
        }
        out.push('\n');
    }
    out
}

fn state(s: &SessionView) -> String {
    let mut state = opt(&s.state);
    if let (Some(kind), Some(event)) = (&s.wait_event_type, &s.wait_event) {
        let _ = write!(state, ", waits on {}:{}", printable(kind), printable(event));
    }
    state
}

fn age(seconds: Option<f64>) -> String {
    seconds.map_or("?".into(), |s| format!("{s:.1}s"))
}

fn render_node(out: &mut String, n: &Node, indent: &str, style: Style) {
    let s = &n.session;
    let _ = writeln!(
        out,
        "{indent}└─ pid {} {} · waits {:.1}s for {} on {}{} · transaction {}",
        s.pid,
        who(s),
        n.wait_seconds,
        printable(&n.mode),
        printable(&n.relation),
        if n.behind > 0 {
            format!(" · {} behind", n.behind)
        } else {
            String::new()
        },
        age(s.transaction_age_seconds),
    );
    let inner = format!("{indent}   ");
    if let Some(query) = &s.query {
        let _ = writeln!(out, "{inner}{}", style.paint("2", &cut(query, QUERY_WIDTH)));
    }
    for child in &n.children {
        match child {
            Child::Session(child) => render_node(out, child, &inner, style),
            Child::Group(g) => {
                let what = match &g.query {
                    Some(query) => format!(
                        "{} from {} ({}) · {}",
                        style.paint("2", &cut(query, QUERY_WIDTH)),
                        opt(&g.application_name),
                        opt(&g.usename),
                        opt(&g.mode)
                    ),
                    None => "more sessions".into(),
                };
                let _ = writeln!(
                    out,
                    "{inner}└─ {} × {what} · waits {:.1}–{:.1}s",
                    g.count, g.wait_seconds_min, g.wait_seconds_max
                );
            }
        }
    }
}

/// One target as `lockjam tree` prints it: a header line, then its
/// trees, one line when calm, or why it could not be sampled.
pub fn render_target(name: &str, look: &LastSample, policy: &Policy, style: Style) -> String {
    let mut out = String::new();
    let version = look
        .server_version
        .map(|v| format!("PostgreSQL {}.{}", v / 10000, v % 10000))
        .unwrap_or_else(|| "PostgreSQL ?".into());
    let at = look.graph.as_ref().map(|g| crate::view::rfc3339(g.taken_at));
    let _ = writeln!(
        out,
        "{} · {version} · {} · policy {}",
        style.paint("1", &format!("target {}", printable(name))),
        at.as_deref().unwrap_or("not sampled"),
        policy.mode()
    );
    for warning in &look.warnings {
        let _ = writeln!(out, "  {} {}", style.paint("33", "warning:"), printable(warning));
    }
    match (&look.graph, &look.last_error) {
        (_, Some(error)) => {
            let _ = writeln!(out, "  {} {}\n", style.paint("31", "down:"), printable(error));
        }
        (Some(graph), None) if graph.waiters.is_empty() => {
            let sessions: u64 = graph.activity.iter().map(|g| g.sessions).sum();
            let _ = writeln!(
                out,
                "  {}: no session waits for a lock ({sessions} sessions)\n",
                style.paint("32", "calm")
            );
        }
        (Some(graph), None) => out.push_str(&render(&build(graph, Some(policy)), style)),
        (None, None) => out.push_str("  no sample yet\n\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::analysis::analyze;
    use crate::policy::Rule;
    use crate::snapshot::{LockRow, Session, Snapshot};

    const AX: &str = "AccessExclusiveLock";
    const AS: &str = "AccessShareLock";

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_800_000_000.0 + seconds)
    }

    fn session(pid: i32, application: &str, query: &str, blocked_by: Option<Vec<i32>>) -> Session {
        Session {
            pid,
            datname: Some("app".into()),
            usename: Some("web".into()),
            application_name: Some(application.into()),
            backend_type: Some("client backend".into()),
            state: Some("active".into()),
            backend_start: Some(at(0.0)),
            xact_start: Some(at(1.0)),
            query: Some(query.into()),
            blocked_by,
            ..Session::default()
        }
    }

    fn lock(pid: i32, granted: bool, mode: &str, relation: &str, wait_start: f64) -> LockRow {
        LockRow {
            pid,
            granted,
            locktype: "relation".into(),
            mode: mode.into(),
            tag: format!("relation:1:{relation}"),
            datname: Some("app".into()),
            relation: Some(relation.into()),
            wait_start: (!granted).then(|| at(wait_start)),
        }
    }

    /// Incident 000 at t=60: a read (10), an ALTER (20) waiting since 50,
    /// and `queries` behind it, waiting since 51.
    fn incident_000(queries: &[&str]) -> LockGraph {
        let mut sessions = vec![
            session(10, "psql", "SELECT pg_sleep(3600)", None),
            session(20, "migrate", "ALTER TABLE orders ...", Some(vec![10])),
        ];
        let mut locks = vec![
            lock(10, true, AS, "public.orders", 0.0),
            lock(20, false, AX, "public.orders", 50.0),
        ];
        for (i, query) in queries.iter().enumerate() {
            let pid = 100 + i as i32;
            sessions.push(session(pid, "web", query, Some(vec![20])));
            locks.push(lock(pid, false, AS, "public.orders", 51.0));
        }
        analyze(&Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions,
            locks,
            existing_databases: None,
            in_recovery: false,
        })
    }

    #[test]
    fn a_queue_is_one_tree_root_head_and_grouped_sessions() {
        let trees = build(&incident_000(&["SELECT 1"; 5]), None);
        assert_eq!(trees.len(), 1);
        let t = &trees[0];
        assert_eq!(
            (t.relation.as_str(), t.mode.as_str(), t.blocked, t.depth),
            ("public.orders", AX, 6, 2)
        );
        assert_eq!(t.roots.iter().map(|r| r.session.pid).collect::<Vec<_>>(), [10]);
        assert_eq!(t.roots[0].holds.as_deref(), Some(AS));
        assert_eq!(t.waiter.session.pid, 20);
        assert_eq!(t.waiter.wait_seconds, 10.0);
        assert!(!t.deadlock);
        assert_eq!(t.next, None);
        let [Child::Group(group)] = t.waiter.children.as_slice() else {
            panic!("{:?}", t.waiter.children)
        };
        assert_eq!(group.count, 5);
        assert_eq!(group.query.as_deref(), Some("SELECT 1"));
        assert_eq!(group.pids, [100, 101, 102, 103, 104]);
        assert_eq!((group.wait_seconds_min, group.wait_seconds_max), (9.0, 9.0));
    }

    #[test]
    fn a_prepared_transaction_at_the_root_is_named_with_its_cure() {
        // pg_blocking_pids names a prepared transaction pid 0; it has no
        // row in pg_stat_activity and holds no lock a pid can show.
        let graph = analyze(&Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions: vec![session(20, "migrate", "ALTER TABLE orders ...", Some(vec![0]))],
            locks: vec![lock(20, false, AX, "public.orders", 50.0)],
            existing_databases: None,
            in_recovery: false,
        });
        let trees = build(&graph, None);
        assert_eq!(trees[0].roots[0].session.pid, 0);
        let text = render(&trees, Style { colour: false });
        assert_eq!(
            text.lines().nth(1),
            Some(format!("    ROOT {PREPARED_ROOT}").as_str()),
            "{text}"
        );
        assert!(!text.contains("?@?"), "{text}");
    }

    #[test]
    fn a_long_queue_lists_a_few_and_folds_the_rest() {
        let queries: Vec<String> = (0..30).map(|i| format!("SELECT {i}")).collect();
        let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
        let trees = build(&incident_000(&queries), None);
        let children = &trees[0].waiter.children;
        assert_eq!(children.len(), MAX_LISTED + 1);
        let Some(Child::Group(rest)) = children.last() else {
            panic!("{children:?}")
        };
        assert_eq!((rest.count, rest.query.as_ref()), (10, None));
        assert_eq!(rest.pids.len(), GROUP_PIDS);
    }

    #[test]
    fn sessions_waiting_on_each_other_make_one_deadlock_tree() {
        let graph = analyze(&Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions: vec![
                session(1, "a", "UPDATE a", Some(vec![2])),
                session(2, "b", "UPDATE b", Some(vec![1])),
            ],
            locks: vec![
                lock(1, true, AX, "public.a", 0.0),
                lock(2, true, AX, "public.b", 0.0),
                lock(1, false, AX, "public.b", 59.0),
                lock(2, false, AX, "public.a", 59.5),
            ],
            existing_databases: None,
            in_recovery: false,
        });
        let trees = build(&graph, None);
        assert_eq!(trees.len(), 1, "{trees:#?}");
        assert!(trees[0].deadlock);
        assert!(trees[0].roots.is_empty());
        assert_eq!(trees[0].blocked, 2);
        let text = render(&trees, Style { colour: false });
        assert!(text.contains("DEADLOCK"), "{text}");
    }

    #[test]
    fn the_policy_says_which_rule_comes_due_and_when() {
        let graph = incident_000(&["SELECT 1"]);
        let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(15))]);
        let next = build(&graph, Some(&policy))[0]
            .next
            .clone()
            .expect("a rule concerns the ALTER");
        assert_eq!(next.rule, "unblock-migrations");
        assert_eq!(next.action, "cancel_blockers");
        assert_eq!((next.waiter_pid, next.due_in_seconds, next.dry_run), (20, 5.0, false));
        let text = render(&build(&graph, Some(&policy)), Style { colour: false });
        assert!(
            text.contains("POLICY rule `unblock-migrations` cancel_blockers (pid 20's wait) in 5.0s"),
            "{text}"
        );
        let off = Policy::default();
        assert_eq!(build(&graph, Some(&off))[0].next, None);
    }

    #[test]
    fn nothing_a_session_sends_reaches_the_terminal_raw() {
        assert_eq!(printable("a\u{1b}[2Jb\u{7}\u{9b}c\nd"), "a\\u{1b}[2Jb\\u{7}\\u{9b}c d");
        assert_eq!(
            printable("root\u{202e}gnp.exe\u{200b}"),
            "root\\u{202e}gnp.exe\\u{200b}"
        );
        let trees = build(&incident_000(&["SELECT '\u{1b}]0;owned\u{7}'"]), None);
        let text = render(&trees, Style { colour: false });
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        let coloured = render(&trees, Style { colour: true });
        assert!(coloured.contains("\u{1b}[1;31mROOT\u{1b}[0m"), "{coloured}");
        assert_eq!(cut("ééé", 2), "éé…");
    }

    /// 30 sessions asking for one advisory lock that a holder has: each
    /// waits behind everyone ahead (PostgreSQL reports them all). They are
    /// one queue, siblings under its first, grouped, not a staircase.
    fn advisory_queue(waiting: i32) -> LockGraph {
        let mut sessions = vec![session(1, "holder", "SELECT pg_advisory_lock(42)", None)];
        let mut locks = vec![LockRow {
            locktype: "advisory".into(),
            tag: "advisory:42".into(),
            relation: None,
            mode: "ExclusiveLock".into(),
            ..lock(1, true, "ExclusiveLock", "x", 0.0)
        }];
        for pid in 2..2 + waiting {
            sessions.push(session(
                pid,
                "worker",
                "SELECT pg_advisory_lock(42)",
                Some((1..pid).collect()),
            ));
            locks.push(LockRow {
                locktype: "advisory".into(),
                tag: "advisory:42".into(),
                relation: None,
                mode: "ExclusiveLock".into(),
                ..lock(pid, false, "ExclusiveLock", "x", 10.0 + pid as f64 / 100.0)
            });
        }
        analyze(&Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions,
            locks,
            existing_databases: None,
            in_recovery: false,
        })
    }

    #[test]
    fn one_queue_for_one_lock_is_siblings_not_a_staircase() {
        let trees = build(&advisory_queue(30), None);
        assert_eq!(trees.len(), 1, "{trees:#?}");
        let head = &trees[0].waiter;
        assert_eq!(head.session.pid, 2);
        let [Child::Group(rest)] = head.children.as_slice() else {
            panic!("{:#?}", head.children)
        };
        assert_eq!(
            (rest.count, rest.query.as_deref()),
            (29, Some("SELECT pg_advisory_lock(42)"))
        );
        assert_eq!(trees[0].blocked, 30);
    }

    #[test]
    fn a_chain_thousands_deep_is_cut_at_the_nesting_limit() {
        // Each session waits for the row the one before it updated: a hard
        // chain 1,500 long, its pids descending along it (the order that
        // walks deepest), analyzed, drawn and serialized on a small stack.
        let n = 1500;
        let mut sessions = vec![session(n, "root", "UPDATE t SET x = 1 WHERE id = 0", None)];
        let mut locks = vec![LockRow {
            locktype: "transactionid".into(),
            tag: format!("transactionid:{n}"),
            relation: None,
            ..lock(n, true, "ExclusiveLock", "x", 0.0)
        }];
        for pid in 1..n {
            sessions.push(session(pid, "app", "UPDATE t SET x = 1", Some(vec![pid + 1])));
            locks.push(LockRow {
                locktype: "transactionid".into(),
                tag: format!("transactionid:{}", pid + 1),
                relation: None,
                ..lock(pid, false, "ShareLock", "x", 10.0)
            });
            locks.push(LockRow {
                locktype: "transactionid".into(),
                tag: format!("transactionid:{pid}"),
                relation: None,
                ..lock(pid, true, "ExclusiveLock", "x", 0.0)
            });
        }
        let snapshot = Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions,
            locks,
            existing_databases: None,
            in_recovery: false,
        };
        let built = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let graph = analyze(&snapshot);
                let trees = build(&graph, None);
                let text = render(&trees, Style { colour: false });
                let json = serde_json::to_string(&trees).unwrap();
                (trees, text.len(), json.len())
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        let (trees, text, json) = built;
        assert_eq!(trees.len(), 1);
        assert_eq!(trees[0].blocked, n as u64 - 1);
        let mut node = &trees[0].waiter;
        let mut levels = 1;
        while let Some(Child::Session(next)) = node.children.first() {
            node = next;
            levels += 1;
        }
        assert_eq!(levels, MAX_NESTING);
        let [Child::Group(rest)] = node.children.as_slice() else {
            panic!("{:#?}", node.children)
        };
        assert_eq!(rest.count, n as u64 - 1 - MAX_NESTING as u64);
        assert!(text < 20_000 && json < 100_000, "{text} bytes of text, {json} of JSON");
    }

    #[test]
    fn a_waiter_behind_a_deadlock_is_in_the_deadlock_s_tree() {
        // 2 and 3 wait on each other; 1 waits on 2.
        let graph = analyze(&Snapshot {
            taken_at: at(60.0),
            activity: Vec::new(),
            sessions: vec![
                session(1, "a", "UPDATE a", Some(vec![2])),
                session(2, "b", "UPDATE b", Some(vec![3])),
                session(3, "c", "UPDATE c", Some(vec![2])),
            ],
            locks: vec![
                lock(2, true, AX, "public.b", 0.0),
                lock(3, true, AX, "public.c", 0.0),
                lock(1, false, AX, "public.b", 58.0),
                lock(2, false, AX, "public.c", 59.0),
                lock(3, false, AX, "public.b", 59.5),
            ],
            existing_databases: None,
            in_recovery: false,
        });
        let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(1))]);
        let trees = build(&graph, Some(&policy));
        assert_eq!(trees.len(), 1, "{trees:#?}");
        assert!(trees[0].deadlock);
        assert_eq!(trees[0].blocked, 3);
        assert_eq!(trees[0].waiter.session.pid, 2);
        assert_eq!(
            trees[0].next, None,
            "PostgreSQL ends a deadlock; the policy does not act"
        );
    }

    #[test]
    fn more_sessions_counts_each_hidden_session_once() {
        // 25 different writers behind an ALTER; a second ALTER behind them.
        let mut queries: Vec<String> = (0..25).map(|i| format!("UPDATE orders SET x = {i}")).collect();
        queries.push("ALTER TABLE orders ADD y int".into());
        let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let trees = build(&incident_000(&refs), None);
        let children = &trees[0].waiter.children;
        let Some(Child::Group(more)) = children.last() else {
            panic!("{children:#?}")
        };
        let listed = children.iter().filter(|c| matches!(c, Child::Session(_))).count() as u64;
        assert_eq!(listed + more.count, 26, "each of the 26 counted once");
    }

    #[test]
    fn a_protected_root_withholds_the_policy_and_says_why() {
        let graph = incident_000(&["SELECT 1"]);
        let policy = Policy {
            protect_applications: vec![crate::policy::Glob("psql".into())],
            ..Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(15))])
        };
        let next = build(&graph, Some(&policy))[0].next.clone().unwrap();
        assert_eq!(next.withheld.as_deref(), Some("application `psql` is protected"));
        let text = render(&build(&graph, Some(&policy)), Style { colour: false });
        assert!(
            text.contains("in 5.0s: withheld, application `psql` is protected"),
            "{text}"
        );
    }
}
