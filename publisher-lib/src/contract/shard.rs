//! Which of several independent Redis servers holds a group: every publisher and gateway
//! replica computes it the same way from the group's name and the number of servers, so they
//! agree by configuration alone (the same list of Redis URLs, in the same order).
//!
//! The rule, for a non-Rust publisher: take the 64-bit FNV-1a hash of the group name's UTF-8
//! bytes (`/dispatch/west`), then Lamping and Veach's jump consistent hash of it over the
//! number of servers. Appending a server moves about `1/n` of the groups, each to the new one,
//! and nothing else; removing or reordering servers moves many more. `docs/redis-contract.md`
//! has test vectors.

use super::Group;

/// The index, in `0..servers`, of the Redis server that holds `group` (0 without servers).
pub fn shard_of(group: &Group, servers: usize) -> usize {
    jump_consistent_hash(fnv1a_64(group.name().as_bytes()), servers)
}

/// 64-bit FNV-1a.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Jump consistent hash ("A Fast, Minimal Memory, Consistent Hash Algorithm", Lamping and
/// Veach, 2014): the bucket in `0..buckets` of `key`.
fn jump_consistent_hash(mut key: u64, buckets: usize) -> usize {
    let buckets = i64::try_from(buckets).unwrap_or(i64::MAX);
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let jump = ((bucket + 1) as f64 * ((1_u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
        next = jump;
    }
    usize::try_from(bucket).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(region: &str) -> Group {
        Group::try_dispatch(region).expect("valid region")
    }

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_hash_matches_the_reference_implementation() {
        // From the reference implementation's own tests (and Guava's consistentHash).
        assert_eq!(jump_consistent_hash(0, 1), 0);
        assert_eq!(jump_consistent_hash(10863919174838991, 11), 6);
        assert_eq!(jump_consistent_hash(2016238256797177309, 11), 3);
        assert_eq!(jump_consistent_hash(1673758223894951030, 11), 5);
        assert_eq!(jump_consistent_hash(2, 100_001), 80_343);
        assert_eq!(jump_consistent_hash(2201, 100_001), 22_152);
        assert_eq!(jump_consistent_hash(2202, 100_001), 15_018);
    }

    #[test]
    fn groups_land_where_the_documented_vectors_say() {
        // docs/redis-contract.md lists these for publishers in other languages.
        let contractor = Group::try_contractor("a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d")
            .expect("valid contractor id");
        assert_eq!(fnv1a_64(b"/dispatch/west"), 0x597b_da61_1415_778e);
        for (group, expected) in [
            (dispatch("west"), [0, 1, 1, 3, 4]),
            (dispatch("east"), [0, 1, 1, 1, 1]),
            (dispatch("north"), [0, 0, 0, 0, 4]),
            (contractor, [0, 1, 1, 1, 1]),
        ] {
            let got: Vec<usize> = (1..=5).map(|servers| shard_of(&group, servers)).collect();
            assert_eq!(got, expected, "{group}");
        }
    }

    #[test]
    fn one_server_holds_everything_and_none_means_zero() {
        assert_eq!(shard_of(&dispatch("west"), 1), 0);
        assert_eq!(shard_of(&dispatch("west"), 0), 0);
    }

    #[test]
    fn appending_a_server_moves_only_groups_to_it_and_about_their_share() {
        let groups: Vec<Group> = (0..3000).map(|i| dispatch(&format!("r{i}"))).collect();
        for servers in 1..6 {
            let moved = groups
                .iter()
                .filter(|group| {
                    let before = shard_of(group, servers);
                    let after = shard_of(group, servers + 1);
                    if before != after {
                        assert_eq!(after, servers, "a group moved, but not to the new server");
                    }
                    before != after
                })
                .count();
            let share = groups.len() / (servers + 1);
            assert!(
                moved > share * 8 / 10 && moved < share * 12 / 10,
                "{moved} of {} moved to server {servers}, expected about {share}",
                groups.len()
            );
        }
    }
}
