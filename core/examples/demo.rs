//! Both cores together in one process, over in-memory links with a fake
//! guest: a postcopy migration of 64 MiB of 4 KiB pages while the guest
//! keeps writing, a lost connection in the middle, then the statistics.
//!
//! `cargo run --release -p postcopy-core --example demo [-- hybrid]`

use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::{Channel, Config, PageNumber, RamLayout};

fn main() {
    let hybrid = std::env::args().any(|a| a == "hybrid");
    let config = if hybrid { Config::hybrid(2) } else { Config::postcopy() };
    let pages = 16 * 1024;
    let mut cfg = PairConfig::new(config, pages);
    cfg.layout = RamLayout::single("ram", 4096, pages).expect("valid layout");
    cfg.vcpus = 2;
    let mut pair = Pair::new(cfg);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // The guest has touched all of its RAM before the migration starts.
    for page in 0..pages {
        pair.guest_access(0, PageNumber(page), true);
    }
    let mut lost = false;
    for step in 0..200_000u64 {
        if pair.finished() {
            break;
        }
        let vcpu = (step % 2) as u32;
        pair.guest_access(vcpu, PageNumber(next() % pages), next() % 4 == 0);
        for channel in Channel::ALL {
            pair.transmit(channel, 64 * 1024);
            while pair.deliver(channel, 1 << 20) {}
        }
        if !lost && pair.dst.core.pages_present() > pages / 2 {
            lost = true;
            pair.lose(Channel::Main);
        }
        pair.check();
        if !pair.violations.is_empty() {
            break;
        }
        if pair.src.core.poll_timeout().is_some_and(|t| t <= pair.now) || step % 64 == 0 {
            pair.fire_timer();
        }
    }
    let outcome = pair.run_to_completion(1_000_000);
    println!("outcome: {outcome:?}");
    let source = pair.src.core.stats(pair.now);
    let destination = pair.dst.core.stats(pair.now);
    println!("source: {}", serde_json::to_string_pretty(&source).unwrap_or_default());
    println!("destination: {}", serde_json::to_string_pretty(&destination).unwrap_or_default());
    if outcome != Ok(postcopy_core::testkit::Outcome::Completed) {
        std::process::exit(1);
    }
}
