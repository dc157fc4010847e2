//! Pure: which replicas of a sharded deployment watch a target. Each
//! target is watched by `copies` of the `replicas` (two: one leads through
//! the target's advisory lock, the other takes over when it goes), chosen
//! by rendezvous hashing of the target's name: every replica computes the
//! same answer on its own, the targets spread evenly, and changing the
//! number of replicas moves only the targets whose chosen replicas change
//! (about `copies / replicas` of them), not all.

use ring::digest::{digest, SHA256};

/// The replicas (0-based ordinals) that watch `target`: `copies` of them,
/// or all `replicas` when there are fewer.
pub fn watchers(target: &str, replicas: u32, copies: u32) -> Vec<u32> {
    let mut scored: Vec<(u64, u32)> = (0..replicas).map(|replica| (score(target, replica), replica)).collect();
    // Highest score first; equal scores (never seen) by ordinal.
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<u32> = scored
        .into_iter()
        .take(copies.min(replicas) as usize)
        .map(|(_, replica)| replica)
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Whether replica `ordinal` watches `target`.
pub fn watches(target: &str, replicas: u32, copies: u32, ordinal: u32) -> bool {
    watchers(target, replicas, copies).contains(&ordinal)
}

/// The weight of `replica` for `target`: SHA-256 of both, so that it is
/// the same on every machine and in every version.
fn score(target: &str, replica: u32) -> u64 {
    let mut input = target.as_bytes().to_vec();
    input.push(0);
    input.extend_from_slice(&replica.to_be_bytes());
    let hash = digest(&SHA256, &input);
    u64::from_be_bytes(hash.as_ref()[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// A replica's ordinal as configured: `3`, or a name that ends in it, as a
/// StatefulSet names its pods (`lockjam-3`).
pub fn parse_ordinal(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let digits = match text.rsplit_once('-') {
        Some((name, digits)) if !name.is_empty() => digits,
        Some(_) => "",
        None => text,
    };
    digits.parse::<u32>().map_err(|_| {
        format!(
            "{text:?} is no replica number: give 0, 1, ... or a StatefulSet pod name ending in one (lockjam-3), \
             e.g. from the pod's metadata.name"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_watched_by_exactly_copies_replicas_for_any_replica_count() {
        let targets: Vec<String> = (0..500).map(|i| format!("db-{i}.internal")).collect();
        for replicas in 1..=12 {
            for copies in 1..=3 {
                let mut load = vec![0usize; replicas as usize];
                for target in &targets {
                    let chosen = watchers(target, replicas, copies);
                    let watching: Vec<u32> = (0..replicas)
                        .filter(|&ordinal| watches(target, replicas, copies, ordinal))
                        .collect();
                    assert_eq!(watching, chosen, "{target}");
                    assert_eq!(
                        chosen.len(),
                        copies.min(replicas) as usize,
                        "{target} with {replicas}×{copies}"
                    );
                    for replica in chosen {
                        load[replica as usize] += 1;
                    }
                }
                // Evenly spread: each replica's count within four standard
                // deviations of its share, as for independent draws.
                let p = copies.min(replicas) as f64 / replicas as f64;
                let share = targets.len() as f64 * p;
                let spread = 4.0 * (share * (1.0 - p)).sqrt();
                for (replica, watched) in load.iter().enumerate() {
                    assert!(
                        (*watched as f64 - share).abs() <= spread,
                        "replica {replica} of {replicas} watches {watched}, share {share:.0} ± {spread:.0}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_more_replica_moves_few_targets() {
        let targets: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
        let moved = targets
            .iter()
            .filter(|t| {
                let before = watchers(t, 4, 2);
                let after = watchers(t, 5, 2);
                before != after
            })
            .count();
        // A target moves when the new replica ranks in its top two: 2/5.
        assert!(moved < 480, "{moved} of 1000 moved");
        assert!(moved > 320, "{moved} of 1000 moved");
    }

    #[test]
    fn the_answer_is_fixed_across_machines_and_versions() {
        assert_eq!(watchers("main", 4, 2), watchers("main", 4, 2));
        // Pinned: a change of hash would reshuffle every fleet on upgrade.
        assert_eq!(watchers("main", 4, 2), PINNED_MAIN);
    }

    const PINNED_MAIN: [u32; 2] = [0, 3];

    #[test]
    fn ordinals_are_numbers_or_pod_names() {
        assert_eq!(parse_ordinal("3"), Ok(3));
        assert_eq!(parse_ordinal("lockjam-12"), Ok(12));
        assert_eq!(parse_ordinal("lockjam-shard-0"), Ok(0));
        assert!(parse_ordinal("lockjam").is_err());
        assert!(parse_ordinal("").is_err());
        assert!(parse_ordinal("-1").is_err());
    }
}
