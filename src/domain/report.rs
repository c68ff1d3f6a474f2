//! Reports: the ranges they cover (UTC calendar periods, half-open), their
//! limits, the access report's query and rows, and the aggregates the store
//! returns for the security summary and dashboard metrics. Pure: the
//! `reports` capability asks the store for these and finishes the figures.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

use crate::domain::alert::{Entity, StatusChange};
use crate::domain::{FieldViolation, Severity};

/// Longest range of any report.
pub const MAX_RANGE: Duration = Duration::days(366);
/// Most rows on one access report page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Rows on an access report page when the request does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Narrowest dashboard bucket, in seconds.
pub const MIN_BUCKET_SECONDS: u32 = 60;
/// Widest dashboard bucket, in seconds (a week).
pub const MAX_BUCKET_SECONDS: u32 = 7 * 86_400;
/// Dashboard bucket width when the request does not say.
pub const DEFAULT_BUCKET_SECONDS: u32 = 3600;
/// Most buckets of one dashboard request.
pub const MAX_BUCKETS: i64 = 1000;
/// Sources listed in a summary's alerts by rule.
pub const TOP_RULES: u32 = 20;
/// Entities listed in a summary's top entities.
pub const TOP_ENTITIES: u32 = 10;
/// How far back a VPN network stays known for an actor.
pub const VPN_HISTORY: Duration = Duration::days(30);
/// Most VPN connects one summary reads (the range plus the 30 days before);
/// beyond it the summary is refused rather than read unbounded.
pub const MAX_VPN_CONNECTS: u32 = 1_000_000;
/// Most incident status entries one summary reads.
pub const MAX_STATUS_ENTRIES: u32 = 200_000;
/// Most critical alerts one dashboard request reads for its unresolved series.
pub const MAX_CRITICAL_ALERTS: u32 = 100_000;

/// A UTC calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A UTC day.
    Daily,
    /// An ISO week (Monday to Monday).
    Weekly,
    /// A calendar month.
    Monthly,
}

impl Period {
    /// The period containing `t`: `[start, end)`.
    pub fn containing(self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let day = t.date_naive();
        let (first, next) = match self {
            Period::Daily => (day, day + Duration::days(1)),
            Period::Weekly => {
                let monday = day - Duration::days(i64::from(day.weekday().num_days_from_monday()));
                (monday, monday + Duration::days(7))
            }
            Period::Monthly => {
                let first = NaiveDate::from_ymd_opt(day.year(), day.month(), 1).expect("day 1");
                let next = if day.month() == 12 {
                    NaiveDate::from_ymd_opt(day.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(day.year(), day.month() + 1, 1)
                }
                .expect("day 1");
                (first, next)
            }
        };
        (midnight(first), midnight(next))
    }

    /// The last complete period before `now`.
    pub fn last_complete(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let (start, _) = self.containing(now);
        self.containing(start - Duration::microseconds(1))
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// A report's half-open UTC range, `[start, end)`, checked: end after start,
/// at most [`MAX_RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReportRange {
    /// Inclusive start.
    pub start: DateTime<Utc>,
    /// Exclusive end.
    pub end: DateTime<Utc>,
}

impl ReportRange {
    /// Checks an explicit range; violations name `field.start` / `field.end`.
    pub fn new(
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        field: &str,
    ) -> Result<Self, FieldViolation> {
        if end <= start {
            return Err(FieldViolation::new(
                format!("{field}.end"),
                format!("must be after {field}.start"),
            ));
        }
        if end - start > MAX_RANGE {
            return Err(FieldViolation::new(
                format!("{field}.end"),
                "the range may span at most 366 days",
            ));
        }
        Ok(Self { start, end })
    }

    /// The range of a period: the one containing `at`, or the last complete
    /// one before `now`.
    pub fn period(period: Period, at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Self {
        let (start, end) = match at {
            Some(t) => period.containing(t),
            None => period.last_complete(now),
        };
        Self { start, end }
    }

    /// Its length in microseconds.
    pub fn micros(&self) -> i64 {
        (self.end - self.start)
            .num_microseconds()
            .unwrap_or(i64::MAX)
    }
}

/// Dashboard buckets: fixed width from the range start; the last one may be
/// shorter (it ends at the range end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// The range.
    pub range: ReportRange,
    /// Width in seconds.
    pub seconds: u32,
}

impl Buckets {
    /// Checks the width (0 means the default) and the bucket count; the
    /// violation names `field`.
    pub fn new(range: ReportRange, seconds: u32, field: &str) -> Result<Self, FieldViolation> {
        let seconds = if seconds == 0 {
            DEFAULT_BUCKET_SECONDS
        } else {
            seconds
        };
        if !(MIN_BUCKET_SECONDS..=MAX_BUCKET_SECONDS).contains(&seconds) {
            return Err(FieldViolation::new(
                field,
                format!("must be {MIN_BUCKET_SECONDS}..{MAX_BUCKET_SECONDS} seconds"),
            ));
        }
        let b = Self { range, seconds };
        if b.count() > MAX_BUCKETS as usize {
            return Err(FieldViolation::new(
                field,
                format!(
                    "the range holds {} buckets of {seconds} s; at most {MAX_BUCKETS}",
                    b.count()
                ),
            ));
        }
        Ok(b)
    }

    /// One bucket spanning the whole range (the summary's totals).
    pub fn whole(range: ReportRange) -> (ReportRange, i64) {
        (range, range.micros())
    }

    /// Width in microseconds.
    pub fn width_micros(&self) -> i64 {
        i64::from(self.seconds) * 1_000_000
    }

    /// How many buckets: the range over the width, rounded up.
    pub fn count(&self) -> usize {
        let w = self.width_micros();
        ((self.range.micros() + w - 1) / w) as usize
    }

    /// Bucket `i`: `[start, end)`.
    pub fn bounds(&self, i: usize) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = self.range.start + Duration::seconds(i as i64 * i64::from(self.seconds));
        let end = (start + Duration::seconds(i64::from(self.seconds))).min(self.range.end);
        (start, end)
    }
}

/// Counts per severity, by level (never by position in a list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeverityCounts {
    /// Info.
    pub info: u64,
    /// Low.
    pub low: u64,
    /// Medium.
    pub medium: u64,
    /// High.
    pub high: u64,
    /// Critical.
    pub critical: u64,
}

impl SeverityCounts {
    /// Adds `n` to `severity`'s count.
    pub fn add(&mut self, severity: Severity, n: u64) {
        let slot = match severity {
            Severity::Info => &mut self.info,
            Severity::Low => &mut self.low,
            Severity::Medium => &mut self.medium,
            Severity::High => &mut self.high,
            Severity::Critical => &mut self.critical,
        };
        *slot += n;
    }

    /// The sum over every level.
    pub fn total(&self) -> u64 {
        self.info + self.low + self.medium + self.high + self.critical
    }
}

/// How the access report groups events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessGrouping {
    /// Per (actor, resource, action).
    ActorResourceAction,
    /// Per (actor, source IP).
    ActorSourceIp,
}

/// An access report page query.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessQuery {
    /// The range.
    pub range: ReportRange,
    /// Grouping.
    pub grouping: AccessGrouping,
    /// Exact actor.
    pub actor: Option<String>,
    /// Event types (any of).
    pub event_types: Vec<String>,
    /// Resource prefix (byte-wise).
    pub resource_prefix: Option<String>,
    /// Only events received at or before this time (pins the pages).
    pub received_before: DateTime<Utc>,
    /// Keyset: only groups strictly after this key.
    pub after: Option<AccessKey>,
    /// Most rows.
    pub limit: u32,
}

/// A group's key: (actor, source IP) uses `a` = source IP ("" for none);
/// (actor, resource, action) uses `a` = resource and `b` = action.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessKey {
    /// The actor.
    pub actor: String,
    /// Source IP or resource.
    pub a: String,
    /// Action ("" with the source IP grouping).
    pub b: String,
}

/// One access report row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRow {
    /// The group.
    pub key: AccessKey,
    /// Events.
    pub count: u64,
    /// Failed events.
    pub failures: u64,
    /// Earliest occurred_at.
    pub first_seen: DateTime<Utc>,
    /// Latest occurred_at.
    pub last_seen: DateTime<Utc>,
    /// Distinct resources.
    pub distinct_resources: u64,
    /// Distinct source IPs (events without one not counted).
    pub distinct_source_ips: u64,
}

/// Event figures of one bucket, as the store aggregates them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventCounts {
    /// Events.
    pub events: u64,
    /// By severity.
    pub by_severity: SeverityCounts,
    /// Authentication attempts.
    pub auth_attempts: u64,
    /// Successful ones.
    pub auth_successes: u64,
    /// Failed ones.
    pub failed_logins: u64,
    /// API calls.
    pub api_calls: u64,
    /// Firewall rule changes.
    pub firewall_rule_changes: u64,
    /// Quota violations.
    pub quota_violations: u64,
    /// VPN connects.
    pub vpn_connects: u64,
    /// VPN disconnects.
    pub vpn_disconnects: u64,
}

impl EventCounts {
    /// Adds every figure of `other` to this one (the rollups and the raw
    /// events after them are counted apart and summed).
    pub fn merge(&mut self, other: &EventCounts) {
        self.events += other.events;
        self.by_severity.info += other.by_severity.info;
        self.by_severity.low += other.by_severity.low;
        self.by_severity.medium += other.by_severity.medium;
        self.by_severity.high += other.by_severity.high;
        self.by_severity.critical += other.by_severity.critical;
        self.auth_attempts += other.auth_attempts;
        self.auth_successes += other.auth_successes;
        self.failed_logins += other.failed_logins;
        self.api_calls += other.api_calls;
        self.firewall_rule_changes += other.firewall_rule_changes;
        self.quota_violations += other.quota_violations;
        self.vpn_connects += other.vpn_connects;
        self.vpn_disconnects += other.vpn_disconnects;
    }
}

/// The network a VPN connect comes from, as "new network" counts it: the
/// IPv4 /24 or the IPv6 /48 of the source IP.
pub fn network_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

/// A run of VPN connects of one actor from one network: connects with no
/// gap longer than [`VPN_HISTORY`] between consecutive ones, from the first
/// (`start`) to the last (`end`). A connect is from a new network exactly
/// when it starts a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpnRun {
    /// The first connect.
    pub start: DateTime<Utc>,
    /// The last connect.
    pub end: DateTime<Utc>,
}

/// The runs that `runs` (of one actor and network: earlier runs and single
/// connects, `start == end`, in any order) make together: sorted, merged
/// wherever the gap between one's last connect and the next's first is at
/// most [`VPN_HISTORY`].
pub fn merge_vpn_runs(mut runs: Vec<VpnRun>) -> Vec<VpnRun> {
    runs.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<VpnRun> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if r.start <= last.end + VPN_HISTORY => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Alerts raised by one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCount {
    /// Rule id, model or webhook source.
    pub source_name: String,
    /// Most recent title.
    pub title: String,
    /// Alerts.
    pub count: u64,
}

/// A recorded status change of an incident, as the summary replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusStep {
    /// Moved to a status (`StatusChanged`).
    To(crate::domain::incident::IncidentStatus),
    /// Reopened by an alert.
    Reopened,
    /// Merged into another incident (closes it, not a resolution).
    MergedAway,
}

/// An incident's status history up to a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentHistory {
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Status steps in order, with their times.
    pub steps: Vec<(DateTime<Utc>, StatusStep)>,
}

/// A critical alert's creation and status history.
#[derive(Debug, Clone, PartialEq)]
pub struct CriticalAlert {
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Status changes, oldest first.
    pub history: Vec<StatusChange>,
}

/// Entity and alert count.
pub type EntityCount = (Entity, u64);

#[cfg(test)]
mod tests {

    #[test]
    fn a_connect_starts_a_run_after_30_days_without_one() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let one = |s: &str| VpnRun {
            start: t(s),
            end: t(s),
        };
        let runs = merge_vpn_runs(vec![
            one("2026-03-10T00:00:00Z"),
            one("2026-02-01T00:00:00Z"), // 37 days before: its own run
            one("2026-03-10T05:00:00Z"),
            VpnRun {
                start: t("2026-04-01T00:00:00Z"),
                end: t("2026-04-02T00:00:00Z"),
            },
            one("2026-05-02T00:00:00Z"), // exactly 30 days after: known
        ]);
        assert_eq!(
            runs,
            vec![
                one("2026-02-01T00:00:00Z"),
                VpnRun {
                    start: t("2026-03-10T00:00:00Z"),
                    end: t("2026-05-02T00:00:00Z"),
                },
            ]
        );
    }
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn periods_are_utc_calendar_ranges() {
        let at = t("2026-03-04T15:00:00Z");
        assert_eq!(
            Period::Daily.containing(at),
            (t("2026-03-04T00:00:00Z"), t("2026-03-05T00:00:00Z"))
        );
        // 2026-03-04 is a Wednesday.
        assert_eq!(
            Period::Weekly.containing(at),
            (t("2026-03-02T00:00:00Z"), t("2026-03-09T00:00:00Z"))
        );
        assert_eq!(
            Period::Monthly.containing(t("2026-12-31T23:59:59Z")),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Daily.last_complete(t("2026-03-04T00:00:00Z")),
            (t("2026-03-03T00:00:00Z"), t("2026-03-04T00:00:00Z"))
        );
        assert_eq!(
            Period::Monthly.last_complete(at),
            (t("2026-02-01T00:00:00Z"), t("2026-03-01T00:00:00Z"))
        );
    }

    #[test]
    fn ranges_and_buckets_are_checked() {
        let r =
            ReportRange::new(t("2026-03-01T00:00:00Z"), t("2026-03-01T10:30:00Z"), "r").unwrap();
        let b = Buckets::new(r, 3600, "bucket_seconds").unwrap();
        assert_eq!(b.count(), 11);
        assert_eq!(
            b.bounds(10),
            (t("2026-03-01T10:00:00Z"), t("2026-03-01T10:30:00Z"))
        );
        assert_eq!(Buckets::new(r, 0, "b").unwrap().seconds, 3600);
        assert_eq!(Buckets::new(r, 59, "b").unwrap_err().field, "b");
        let long =
            ReportRange::new(t("2026-01-01T00:00:00Z"), t("2026-03-01T00:00:00Z"), "r").unwrap();
        assert!(Buckets::new(long, 60, "b").is_err());
        assert_eq!(
            ReportRange::new(r.end, r.start, "time_range")
                .unwrap_err()
                .field,
            "time_range.end"
        );
        assert!(ReportRange::new(r.start, r.start + Duration::days(367), "x").is_err());
    }

    #[test]
    fn severities_are_counted_by_level() {
        let mut c = SeverityCounts::default();
        c.add(Severity::Critical, 2);
        c.add(Severity::Info, 1);
        assert_eq!((c.info, c.low, c.critical, c.total()), (1, 0, 2, 3));
    }
}
