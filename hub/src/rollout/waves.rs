//! Who is in which wave. Each device has a stable seed, a hash of its id, so
//! the canary set does not change from one rollout to the next and is spread
//! over the fleet rather than one site's devices registered first. Waves
//! cover the targeted devices in seed order.

use outpost_proto::fleet::Wave;

/// A device's place in every rollout: the first 8 bytes of sha256(id).
pub fn seed(device: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, device.as_bytes());
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("sha256 has 32 bytes"))
}

/// The targeted devices in wave order.
pub fn order<'a>(devices: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ordered: Vec<(u64, &str)> = devices.into_iter().map(|id| (seed(id), id)).collect();
    ordered.sort_unstable();
    ordered.into_iter().map(|(_, id)| id).collect()
}

/// How many of `targeted` devices waves `0..=wave` cover together. The
/// last wave covers them all, whatever it says.
pub fn covered(waves: &[Wave], wave: usize, targeted: usize) -> usize {
    if wave + 1 >= waves.len() {
        return targeted;
    }
    waves[..=wave].iter().map(|w| w.size(targeted)).max().unwrap_or(targeted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site-{}-dev-{i}", i % 7)).collect()
    }

    #[test]
    fn the_wave_order_is_stable_whatever_order_devices_come_in() {
        let devices = fleet(50);
        let forward = order(devices.iter().map(String::as_str));
        let backward = order(devices.iter().rev().map(String::as_str));
        assert_eq!(forward, backward);
        assert_eq!(seed("pump-3"), seed("pump-3"));
    }

    #[test]
    fn a_device_keeps_its_place_ahead_of_others_when_the_fleet_grows() {
        let small = fleet(100);
        let large = fleet(1000);
        let canaries_small = &order(small.iter().map(String::as_str))[..10];
        let order_large = order(large.iter().map(String::as_str));
        // Relative order of the first fleet's devices is unchanged.
        let kept: Vec<&str> = order_large.iter().copied().filter(|d| small.iter().any(|s| s == d)).collect();
        assert_eq!(&kept[..10], canaries_small);
    }

    #[test]
    fn canaries_spread_over_sites() {
        let devices = fleet(700);
        let first = &order(devices.iter().map(String::as_str))[..70];
        let sites: std::collections::BTreeSet<&str> = first.iter().map(|d| &d[..6]).collect();
        assert_eq!(sites.len(), 7, "the first 10% come from every site: {first:?}");
    }

    #[test]
    fn waves_cover_cumulatively_and_the_last_covers_everyone() {
        let waves = [Wave::Devices(1), Wave::Percent(10.0), Wave::Percent(50.0), Wave::Percent(90.0)];
        assert_eq!(covered(&waves, 0, 431), 1);
        assert_eq!(covered(&waves, 1, 431), 44);
        assert_eq!(covered(&waves, 2, 431), 216);
        assert_eq!(covered(&waves, 3, 431), 431, "the last wave is the whole fleet");
        assert_eq!(covered(&waves, 0, 0), 0);
        // A wave smaller than one before it does not shrink what is covered.
        assert_eq!(covered(&[Wave::Devices(20), Wave::Devices(5), Wave::Percent(100.0)], 1, 100), 20);
    }
}
