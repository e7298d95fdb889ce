//! Installer answers: what to install where, from an answer file, the kernel command line or
//! the operator at the console.
//!
//! All three give the same keys. An answer file holds `key = value` lines (`#` starts a
//! comment); the kernel command line holds `strata.KEY=VALUE` words. Unknown keys are refused
//! by name, so that a typo never silently falls back to a default. Every value is validated
//! here, once, whatever its source; [`Answers`] holds only valid values, safe to write into
//! the installed system's shell-readable configuration.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use strata_storage::util::parse_size;

use super::error::{InstallError, InstallResult};

/// Every answer key with its default and meaning (the README documents the same table).
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "disk",
        "auto",
        "target disk: /dev/NAME, NAME, or auto (the only eligible disk)",
    ),
    (
        "wipe",
        "no",
        "yes: replace a Strata volume group or installation found on the disk",
    ),
    ("hostname", "strata", "host name of the installed system"),
    (
        "listen",
        "0.0.0.0:8006",
        "address and port `strata serve` listens on",
    ),
    ("network", "dhcp", "dhcp, static or none"),
    (
        "interface",
        "auto",
        "network interface (auto: every Ethernet interface, dhcp only)",
    ),
    (
        "address",
        "",
        "static IPv4 address with prefix length, e.g. 192.168.1.10/24",
    ),
    ("gateway", "", "static default gateway (IPv4)"),
    (
        "bridge",
        "br0",
        "bridge for VMs with the management interface as its port and the address (as Proxmox \
         VE's vmbr0); with interface auto, the first Ethernet interface; none: no bridge",
    ),
    ("dns", "", "static DNS servers, comma-separated"),
    (
        "root-size",
        "",
        "size of the root file system (default: a quarter of the disk, 4G to 64G)",
    ),
    ("token-name", "admin", "name of the first API token"),
    (
        "token-to",
        "console",
        "where the first token goes: console, or vfat:LABEL (a FAT volume)",
    ),
    (
        "console",
        "ttyS0,115200",
        "console of the installed system: ttyNAME[,SPEED]",
    ),
    (
        "root-password-hash",
        "",
        "crypt hash ($6$/$5$/$1$) for console login; empty: locked",
    ),
    (
        "after",
        "reboot",
        "what to do when the installation succeeded: reboot, poweroff or shell",
    ),
];

/// Kernel command-line words for the ISO's init, not answers.
const INIT_KEYS: &[&str] = &["mode", "media-wait"];

/// Answers as given: key to text, not yet validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawAnswers {
    values: BTreeMap<String, String>,
}

fn known(key: &str) -> bool {
    KEYS.iter().any(|(k, _, _)| *k == key)
}

fn unknown_key(key: &str) -> String {
    let list: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
    format!("unknown key {key:?} (known keys: {})", list.join(", "))
}

impl RawAnswers {
    /// Parses an answer file's text; `path` is only for messages.
    pub fn parse_file(text: &str, path: &Path) -> InstallResult<RawAnswers> {
        let err = |line: usize, reason: String| InstallError::AnswerFile {
            path: path.to_path_buf(),
            reason: format!("line {line}: {reason}"),
        };
        let mut raw = RawAnswers::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err(i + 1, format!("expected key = value, got {line:?}")))?;
            let key = key.trim();
            let mut value = value.trim();
            if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                value = &value[1..value.len() - 1];
            }
            if !known(key) {
                return Err(err(i + 1, unknown_key(key)));
            }
            if raw
                .values
                .insert(key.to_string(), value.to_string())
                .is_some()
            {
                return Err(err(i + 1, format!("{key} is given twice")));
            }
        }
        Ok(raw)
    }

    /// Reads and parses an answer file.
    pub fn read_file(path: &Path) -> InstallResult<RawAnswers> {
        let text = std::fs::read_to_string(path).map_err(|e| InstallError::AnswerFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        RawAnswers::parse_file(&text, path)
    }

    /// The `strata.KEY=VALUE` words of a kernel command line.
    pub fn parse_cmdline(cmdline: &str) -> InstallResult<RawAnswers> {
        let mut raw = RawAnswers::default();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("strata.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            if INIT_KEYS.contains(&key) {
                continue;
            }
            if !known(key) {
                return Err(InstallError::answer(key, value, unknown_key(key)));
            }
            raw.values.insert(key.to_string(), value.to_string());
        }
        Ok(raw)
    }

    /// Takes every answer of `over`, replacing ours.
    pub fn merge(&mut self, over: RawAnswers) {
        self.values.extend(over.values);
    }

    /// The answer for `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Sets an answer (the interactive installer's way in).
    pub fn set(&mut self, key: &str, value: &str) {
        self.values.insert(key.to_string(), value.to_string());
    }

    /// Whether no answer was given at all.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Which disk to install on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskChoice {
    /// The only eligible disk.
    Auto,
    /// A named disk (`/dev/vda` or `vda`).
    Named(String),
}

/// The installed system's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// DHCP on one interface or (`auto`) on every Ethernet interface.
    Dhcp {
        /// Interface name or `auto`.
        interface: String,
    },
    /// A fixed IPv4 address.
    Static {
        /// Interface name.
        interface: String,
        /// Address.
        address: Ipv4Addr,
        /// Prefix length.
        prefix: u8,
        /// Default gateway.
        gateway: Option<Ipv4Addr>,
        /// DNS servers.
        dns: Vec<IpAddr>,
    },
    /// No network configuration (loopback only).
    None,
}

/// Where the first API token goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenDelivery {
    /// Printed on the console at the end of the installation.
    Console,
    /// Written, with an installation report, to the FAT volume with this label.
    Vfat(String),
}

/// What the ISO's init does after a successful installation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Restart (into the installed system).
    Reboot,
    /// Power off.
    Poweroff,
    /// Open a shell on the console.
    Shell,
}

impl After {
    /// The word the ISO's init reads.
    pub fn as_str(self) -> &'static str {
        match self {
            After::Reboot => "reboot",
            After::Poweroff => "poweroff",
            After::Shell => "shell",
        }
    }
}

/// The installed system's console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Console {
    /// Device name, e.g. `ttyS0` or `tty1`.
    pub tty: String,
    /// Serial speed; `None` for a virtual terminal.
    pub speed: Option<u32>,
}

impl Console {
    /// The serial port number when this is a serial console (`ttyS1` → 1).
    pub fn serial_unit(&self) -> Option<u32> {
        self.tty.strip_prefix("ttyS")?.parse().ok()
    }

    /// The kernel's `console=` words: the screen, and this console last so that it becomes
    /// `/dev/console`.
    pub fn kernel_args(&self) -> String {
        if self.tty == "tty0" {
            return "console=tty0".into();
        }
        match self.speed {
            Some(s) => format!("console=tty0 console={},{s}", self.tty),
            None => format!("console=tty0 console={}", self.tty),
        }
    }
}

/// Validated answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answers {
    /// Target disk.
    pub disk: DiskChoice,
    /// Replace an existing Strata volume group or installation.
    pub wipe: bool,
    /// Host name.
    pub hostname: String,
    /// API address.
    pub listen: SocketAddr,
    /// Network.
    pub network: Network,
    /// The management bridge (its port the management interface, the address on it), which
    /// the installed system makes at boot and records as the network of the same name; `None`
    /// without a network or when the answer is `none`.
    pub bridge: Option<String>,
    /// Root file system size; `None` for the default.
    pub root_size: Option<u64>,
    /// Name of the first token.
    pub token_name: String,
    /// Where the first token goes.
    pub token_to: TokenDelivery,
    /// Console.
    pub console: Console,
    /// Root's password hash; `None` locks console login.
    pub root_password_hash: Option<String>,
    /// What happens after success.
    pub after: After,
}

fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, d, _)| *d)
        .unwrap_or("")
}

impl Answers {
    /// Validates raw answers, filling in defaults.
    pub fn from_raw(raw: &RawAnswers) -> InstallResult<Answers> {
        let get = |k: &str| raw.get(k).unwrap_or(default_of(k)).trim().to_string();
        let bad = |k: &str, why: &str| InstallError::answer(k, &get(k), why);

        let disk = match get("disk").as_str() {
            "" | "auto" => DiskChoice::Auto,
            d => DiskChoice::Named(parse_disk_name(d).ok_or_else(|| {
                bad(
                    "disk",
                    "expected auto, /dev/NAME or NAME (a whole disk such as vda, sda, nvme0n1)",
                )
            })?),
        };
        let wipe = parse_bool(&get("wipe")).ok_or_else(|| bad("wipe", "expected yes or no"))?;
        let hostname = get("hostname");
        if !valid_hostname(&hostname) {
            return Err(bad(
                "hostname",
                "expected letters, digits and '-' in dot-separated labels of 1 to 63 characters",
            ));
        }
        let listen: SocketAddr = get("listen").parse().map_err(|_| {
            bad(
                "listen",
                "expected ADDRESS:PORT, e.g. 0.0.0.0:8006 or [::]:8006",
            )
        })?;
        let network = parse_network(&get)?;
        let bridge = match (get("bridge").as_str(), &network) {
            ("none", _) | (_, Network::None) => None,
            (b, _) if !valid_interface(b) => {
                return Err(bad(
                    "bridge",
                    "expected none or an interface name such as br0 (1 to 15 characters)",
                ))
            }
            (b, Network::Dhcp { interface } | Network::Static { interface, .. })
                if b == interface =>
            {
                return Err(bad("bridge", "the bridge cannot be the interface itself"));
            }
            (b, _) => Some(b.to_string()),
        };
        let root_size = match get("root-size").as_str() {
            "" => None,
            s => Some(parse_size(s).map_err(|e| bad("root-size", &e.to_string()))?),
        };
        let token_name = get("token-name");
        strata_service::names::validate("token", &token_name)
            .map_err(|e| bad("token-name", &e.to_string()))?;
        let token_to = match get("token-to").as_str() {
            "console" => TokenDelivery::Console,
            t => match t.strip_prefix("vfat:") {
                Some(label) if valid_fat_label(label) => TokenDelivery::Vfat(label.to_string()),
                _ => {
                    return Err(bad(
                        "token-to",
                        "expected console or vfat:LABEL (1 to 11 characters A-Z 0-9 _ -)",
                    ))
                }
            },
        };
        let console = parse_console(&get("console")).ok_or_else(|| {
            bad(
                "console",
                "expected ttyNAME[,SPEED], e.g. ttyS0,115200 or tty0",
            )
        })?;
        let root_password_hash = match get("root-password-hash").as_str() {
            "" => None,
            h if valid_crypt_hash(h) => Some(h.to_string()),
            _ => {
                return Err(bad(
                    "root-password-hash",
                    "expected a $6$, $5$ or $1$ crypt hash (e.g. from `mkpasswd -m sha-512`)",
                ))
            }
        };
        let after = match get("after").as_str() {
            "reboot" => After::Reboot,
            "poweroff" => After::Poweroff,
            "shell" => After::Shell,
            _ => return Err(bad("after", "expected reboot, poweroff or shell")),
        };
        Ok(Answers {
            disk,
            wipe,
            hostname,
            listen,
            network,
            bridge,
            root_size,
            token_name,
            token_to,
            console,
            root_password_hash,
            after,
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Some(true),
        "no" | "false" | "0" | "off" | "" => Some(false),
        _ => None,
    }
}

/// `/dev/vda` or `vda` → `vda`, for names the kernel gives whole disks.
pub fn parse_disk_name(text: &str) -> Option<String> {
    let name = text.strip_prefix("/dev/").unwrap_or(text);
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_alphanumeric())
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    ok.then(|| name.to_string())
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_fat_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 11
        && label
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

fn valid_crypt_hash(h: &str) -> bool {
    let scheme_ok = ["$1$", "$5$", "$6$"].iter().any(|p| h.starts_with(p));
    scheme_ok
        && h.len() <= 512
        && h.chars()
            .all(|c| c.is_ascii_graphic() && c != ':' && c != '\'')
}

fn parse_console(text: &str) -> Option<Console> {
    let (tty, speed) = match text.split_once(',') {
        Some((t, s)) => (t, Some(s.parse::<u32>().ok().filter(|s| *s > 0)?)),
        None => (text, None),
    };
    let rest = tty.strip_prefix("tty")?;
    let ok = !rest.is_empty()
        && rest.len() <= 12
        && rest.chars().all(|c| c.is_ascii_alphanumeric())
        && rest.ends_with(|c: char| c.is_ascii_digit());
    ok.then(|| Console {
        tty: tty.to_string(),
        speed,
    })
}

fn parse_network(get: &dyn Fn(&str) -> String) -> InstallResult<Network> {
    let bad = |k: &str, why: &str| InstallError::answer(k, &get(k), why);
    let interface = get("interface");
    match get("network").as_str() {
        "dhcp" => {
            if interface != "auto" && !valid_interface(&interface) {
                return Err(bad(
                    "interface",
                    "expected auto or an interface name such as eth0",
                ));
            }
            Ok(Network::Dhcp { interface })
        }
        "none" => Ok(Network::None),
        "static" => {
            let interface = if interface == "auto" {
                "eth0".to_string()
            } else {
                interface
            };
            if !valid_interface(&interface) {
                return Err(bad("interface", "expected an interface name such as eth0"));
            }
            let addr = get("address");
            let (ip, prefix) = addr
                .split_once('/')
                .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
                .filter(|(_, p)| (1..=32).contains(p))
                .ok_or_else(|| {
                    bad(
                        "address",
                        "expected an IPv4 address with prefix length, e.g. 192.168.1.10/24",
                    )
                })?;
            let gateway = match get("gateway").as_str() {
                "" => None,
                g => Some(
                    g.parse()
                        .map_err(|_| bad("gateway", "expected an IPv4 address"))?,
                ),
            };
            let dns = get("dns")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<IpAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad("dns", "expected IP addresses separated by commas"))?;
            Ok(Network::Static {
                interface,
                address: ip,
                prefix,
                gateway,
                dns,
            })
        }
        _ => Err(bad("network", "expected dhcp, static or none")),
    }
}

/// Where answers come from, in increasing precedence: the answer file on the installation
/// medium, the kernel command line, an answer file named on the `strata install` command line.
#[derive(Clone, Debug, Default)]
pub struct AnswerSources {
    /// `MEDIA/strata/answers.conf`, if a medium is mounted.
    pub media_file: Option<PathBuf>,
    /// The kernel command line file (`/proc/cmdline`).
    pub cmdline: Option<PathBuf>,
    /// `--answers FILE`.
    pub explicit_file: Option<PathBuf>,
}

impl AnswerSources {
    /// Reads and merges every source that exists. Missing optional files are skipped; an
    /// explicitly named file must exist.
    pub fn load(&self) -> InstallResult<(RawAnswers, Vec<String>)> {
        let mut raw = RawAnswers::default();
        let mut used = Vec::new();
        if let Some(f) = self.media_file.as_ref().filter(|f| f.exists()) {
            raw.merge(RawAnswers::read_file(f)?);
            used.push(format!("answer file {}", f.display()));
        }
        if let Some(c) = &self.cmdline {
            let text = std::fs::read_to_string(c)
                .map_err(|e| InstallError::io("Reading", c.clone(), e))?;
            let from_cmdline = RawAnswers::parse_cmdline(&text)?;
            if !from_cmdline.is_empty() {
                raw.merge(from_cmdline);
                used.push("kernel command line".into());
            }
        }
        if let Some(f) = &self.explicit_file {
            raw.merge(RawAnswers::read_file(f)?);
            used.push(format!("answer file {}", f.display()));
        }
        Ok((raw, used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(text: &str) -> InstallResult<Answers> {
        Answers::from_raw(&RawAnswers::parse_file(text, Path::new("a.conf"))?)
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let a = answers("# nothing\n\n").unwrap();
        assert_eq!(a.disk, DiskChoice::Auto);
        assert!(!a.wipe);
        assert_eq!(a.hostname, "strata");
        assert_eq!(a.listen, "0.0.0.0:8006".parse().unwrap());
        assert_eq!(
            a.network,
            Network::Dhcp {
                interface: "auto".into()
            }
        );
        assert_eq!(a.bridge.as_deref(), Some("br0"));
        assert_eq!(a.token_to, TokenDelivery::Console);
        assert_eq!(a.console.kernel_args(), "console=tty0 console=ttyS0,115200");
        assert_eq!(a.console.serial_unit(), Some(0));
        assert_eq!(a.after, After::Reboot);
        assert_eq!(a.root_size, None);
    }

    #[test]
    fn a_full_file_parses() {
        let a = answers(
            "disk = /dev/sdb\nwipe = yes\nhostname = store1.example.org\nlisten = [::]:443\n\
             network = static\ninterface = ens3\naddress = 10.1.2.3/16\ngateway = 10.1.0.1\n\
             dns = 10.1.0.2, 9.9.9.9\nroot-size = 12G\ntoken-name = ops\n\
             token-to = vfat:STRATA-OUT\nconsole = \"tty1\"\nafter = poweroff\n\
             root-password-hash = $6$salt$abcdefghijklmnop\n",
        )
        .unwrap();
        assert_eq!(a.disk, DiskChoice::Named("sdb".into()));
        assert!(a.wipe);
        assert_eq!(a.root_size, Some(12 << 30));
        assert_eq!(a.token_to, TokenDelivery::Vfat("STRATA-OUT".into()));
        assert_eq!(a.console.kernel_args(), "console=tty0 console=tty1");
        assert_eq!(a.console.serial_unit(), None);
        assert_eq!(a.after, After::Poweroff);
        match a.network {
            Network::Static {
                interface,
                prefix,
                gateway,
                dns,
                ..
            } => {
                assert_eq!(interface, "ens3");
                assert_eq!(prefix, 16);
                assert_eq!(gateway, Some(Ipv4Addr::new(10, 1, 0, 1)));
                assert_eq!(dns.len(), 2);
            }
            n => panic!("{n:?}"),
        }
    }

    #[test]
    fn the_bridge_can_be_renamed_or_left_out() {
        assert_eq!(
            answers("bridge = vmbr0\n").unwrap().bridge.as_deref(),
            Some("vmbr0")
        );
        assert_eq!(answers("bridge = none\n").unwrap().bridge, None);
        // Without a network there is no management interface to bridge.
        assert_eq!(answers("network = none\n").unwrap().bridge, None);
    }

    #[test]
    fn bad_answers_are_refused_by_name() {
        for (text, key) in [
            ("disk = /dev/../sda", "disk"),
            ("wipe = maybe", "wipe"),
            ("hostname = bad_host", "hostname"),
            ("hostname = -x", "hostname"),
            ("listen = 8006", "listen"),
            ("network = wifi", "network"),
            ("network = static\naddress = 10.0.0.1", "address"),
            ("network = static\naddress = 10.0.0.1/33", "address"),
            (
                "network = static\naddress = 10.0.0.1/8\ngateway = x",
                "gateway",
            ),
            ("root-size = lots", "root-size"),
            ("token-name = a b", "token-name"),
            ("token-to = usb", "token-to"),
            ("token-to = vfat:lower", "token-to"),
            ("console = com1", "console"),
            ("console = ttyS0,fast", "console"),
            ("root-password-hash = secret", "root-password-hash"),
            ("root-password-hash = $6$a:b", "root-password-hash"),
            ("after = dance", "after"),
            ("bridge = br 0", "bridge"),
            ("bridge = a-bridge-name-too-long", "bridge"),
            ("interface = eth1\nbridge = eth1", "bridge"),
        ] {
            match answers(text) {
                Err(InstallError::BadAnswer { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn file_syntax_errors_name_the_line() {
        for (text, line) in [
            ("disk = vda\nbogus = 1", "line 2"),
            ("\n\njust words", "line 3"),
            ("disk = vda\ndisk = vdb", "line 2"),
        ] {
            let e = RawAnswers::parse_file(text, Path::new("x.conf")).unwrap_err();
            assert!(e.to_string().contains(line), "{e}");
        }
    }

    #[test]
    fn cmdline_answers_override_the_file_and_init_words_are_skipped() {
        let mut raw = RawAnswers::parse_file("disk = vda\nhostname = a", Path::new("f")).unwrap();
        let cmd = RawAnswers::parse_cmdline(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 strata.mode=auto strata.media-wait=5 \
             strata.hostname=b strata.wipe=yes quiet",
        )
        .unwrap();
        raw.merge(cmd);
        let a = Answers::from_raw(&raw).unwrap();
        assert_eq!(a.hostname, "b");
        assert!(a.wipe);
        assert_eq!(a.disk, DiskChoice::Named("vda".into()));
        assert!(RawAnswers::parse_cmdline("strata.dsik=vda").is_err());
        assert!(RawAnswers::parse_cmdline("root=/dev/sda1 quiet")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn sources_merge_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let media = dir.path().join("media.conf");
        let cmdline = dir.path().join("cmdline");
        let explicit = dir.path().join("explicit.conf");
        std::fs::write(&media, "hostname = m\nlisten = 127.0.0.1:1\ndisk = vda\n").unwrap();
        std::fs::write(&cmdline, "strata.hostname=c strata.listen=127.0.0.1:2\n").unwrap();
        std::fs::write(&explicit, "listen = 127.0.0.1:3\n").unwrap();
        let src = AnswerSources {
            media_file: Some(media),
            cmdline: Some(cmdline),
            explicit_file: Some(explicit),
        };
        let (raw, used) = src.load().unwrap();
        assert_eq!(used.len(), 3);
        let a = Answers::from_raw(&raw).unwrap();
        assert_eq!((a.hostname.as_str(), a.listen.port()), ("c", 3));
        assert_eq!(a.disk, DiskChoice::Named("vda".into()));
        let missing = AnswerSources {
            media_file: Some(dir.path().join("absent")),
            ..Default::default()
        };
        assert!(missing.load().unwrap().0.is_empty());
    }
}
