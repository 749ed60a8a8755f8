//! A private network for multi-node tests: one Linux bridge on the host with a /24 of its own
//! and one network namespace per node, each joined to the bridge by a veth pair. Agents run
//! inside the namespaces (`ip netns exec`), so each node has its own address and its own
//! loopback, and reaches the server only over the bridge. Everything is removed on drop
//! (deleting a namespace deletes its veth pair; the bridge is deleted last); the test touches
//! no interface or rule it did not make.

use std::process::Command;
use std::sync::Mutex;

/// Held while a lab picks its /24 and puts it on its bridge: tests in one binary run in
/// parallel threads, and two labs must not both see the same /24 as free.
static CHOOSING: Mutex<()> = Mutex::new(());

/// Run `ip ARGS…`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The addresses on this host, to pick a /24 nobody uses.
fn used_addresses() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A bridge and `n` namespaces on `10.213.X.0/24` (host `.1`, node `i` at `.(10+i)`).
pub struct NetLab {
    tag: String,
    net: String,
    namespaces: Vec<String>,
}

impl NetLab {
    pub fn new(n: usize) -> NetLab {
        assert!(n < 200);
        // Interface names are at most 15 bytes: `kb` + 6 hex + `h9`… stays short.
        let tag = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
        let choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
        let used = used_addresses();
        let third = (0..=255u32)
            .map(|i| (u32::from_str_radix(&tag[..2], 16).unwrap() + i) % 256)
            .find(|x| !used.contains(&format!("10.213.{x}.")))
            .expect("a free 10.213.X.0/24");
        let net = format!("10.213.{third}");
        let mut lab = NetLab {
            tag: tag.clone(),
            net: net.clone(),
            namespaces: Vec::new(),
        };
        let bridge = lab.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        drop(choosing);
        for i in 0..n {
            let ns = format!("kn{tag}{i}");
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let (host, peer) = (format!("kv{tag}{i}h"), format!("kv{tag}{i}n"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &ns]);
            ip(&["link", "set", &host, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.node_ip(i)),
                "dev",
                &peer,
            ]);
            ip(&["-n", &ns, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn bridge(&self) -> String {
        format!("kb{}", self.tag)
    }

    /// The host's address on the private network (where the server listens for nodes).
    pub fn host_ip(&self) -> String {
        format!("{}.1", self.net)
    }

    /// Node `i`'s address.
    pub fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.net, 10 + i)
    }

    /// Node `i`'s namespace name (for `ip netns exec`).
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}
