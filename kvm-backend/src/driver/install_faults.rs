//! Test-only install faults on the destination
//! (`POSTCOPY_TEST_INSTALL_FAULT=KIND:PAGE[:TIMES]`), like the damage switch
//! ([`super::Damage`]): the install of page `PAGE` (its number in the
//! layout) fails `TIMES` times in the way `KIND` says, so that the driver's
//! failure paths can be run end to end:
//!
//! - `fail`: the kernel refuses the page (`ENOMEM`); once by default. The
//!   driver reports it to the core, which pauses; the source reconnects and
//!   sends the page again.
//! - `again`: `EAGAIN` (address space changing); 40 times by default, more
//!   than one install retries (the driver retries it itself).
//! - `partial`: the fill stops part-way at the page, as a kernel cut short
//!   does; once by default.
//! - `wake`: the page is installed, waking its waiters fails; once.
//!
//! A `TIMES` large enough (e.g. `fail:300:1000`) makes the failure one the
//! migration cannot survive: it ends with a typed error, the guest paused.

use crate::uffd::InjectedFault;

/// Name of the environment variable that asks for an install fault.
pub const INSTALL_FAULT_ENV: &str = "POSTCOPY_TEST_INSTALL_FAULT";

/// A parsed install fault: what, at which page, how many times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstallFault {
    /// What the install does.
    pub fault: InjectedFault,
    /// The page's number in the layout.
    pub page: u64,
    /// How many installs it hits.
    pub times: u32,
}

/// A value of [`INSTALL_FAULT_ENV`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{INSTALL_FAULT_ENV}={value}: expected fail|again|partial|wake:PAGE[:TIMES]")]
pub struct InstallFaultParseError {
    /// The value given.
    pub value: String,
}

impl InstallFault {
    /// Parses `KIND:PAGE[:TIMES]`.
    pub fn parse(s: &str) -> Result<Self, InstallFaultParseError> {
        let bad = || InstallFaultParseError { value: s.to_owned() };
        let mut parts = s.split(':');
        let (fault, default_times) = match parts.next() {
            Some("fail") => (InjectedFault::Fail(libc::ENOMEM), 1),
            Some("again") => (InjectedFault::Again, 40),
            Some("partial") => (InjectedFault::Partial, 1),
            Some("wake") => (InjectedFault::WakeFails, 1),
            _ => return Err(bad()),
        };
        let page = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let times = match parts.next() {
            Some(t) => t.parse().map_err(|_| bad())?,
            None => default_times,
        };
        if parts.next().is_some() || times == 0 {
            return Err(bad());
        }
        Ok(Self { fault, page, times })
    }

    /// From the environment, if set.
    pub fn from_env() -> Result<Option<Self>, InstallFaultParseError> {
        match std::env::var(INSTALL_FAULT_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_fault_switch_parses() {
        let f = InstallFault::parse("fail:300").unwrap();
        assert_eq!(f, InstallFault { fault: InjectedFault::Fail(libc::ENOMEM), page: 300, times: 1 });
        assert_eq!(InstallFault::parse("again:7").unwrap().times, 40);
        assert_eq!(InstallFault::parse("partial:7:3").unwrap().times, 3);
        assert_eq!(InstallFault::parse("wake:0").unwrap().fault, InjectedFault::WakeFails);
        for bad in ["", "fail", "fail:x", "drop:3", "fail:3:0", "fail:3:1:2", "again:3:y"] {
            assert!(InstallFault::parse(bad).is_err(), "{bad}");
        }
    }
}
