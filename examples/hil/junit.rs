//! JUnit XML from a KTAP report, in the shape CI dashboards (Jenkins, GitLab, GitHub test
//! reporters) read: one `<testsuite>` per KTAP suite, one `<testcase>` per case, a failed case
//! with `<failure>` holding its diagnostic lines, a skipped one with `<skipped message=...>`. A run
//! that did not report completely (crash, time-out, lost lines) adds a suite `hil` with one
//! `<error>` case, so the dashboard shows it even when every reported case passed.

use dmakern::ktest::parse::{CaseResult, Report, Status};
use std::fmt::Write;

/// `s` escaped for XML text and attribute values; characters XML 1.0 cannot hold (control
/// characters other than tab, CR and LF) become U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Suite names in report order: the top-level results first, then suites whose cases ran but
/// whose result line never came (a crash inside them).
fn suite_order(r: &Report) -> Vec<String> {
    let mut names: Vec<String> = r.suites.iter().map(|(n, _)| n.clone()).collect();
    for c in &r.cases {
        if !names.contains(&c.suite) {
            names.push(c.suite.clone());
        }
    }
    names
}

fn write_case(x: &mut String, c: &CaseResult) {
    let open = format!("    <testcase classname=\"dmakern.{}\" name=\"{}\"", escape(&c.suite), escape(&c.name));
    match &c.status {
        Status::Pass => {
            let _ = writeln!(x, "{open}/>");
        }
        Status::Skip(why) => {
            let _ = writeln!(x, "{open}>\n      <skipped message=\"{}\"/>\n    </testcase>", escape(why));
        }
        Status::Fail => {
            // The kernel prints a failure as `# case: file:line: message` lines before `not ok`.
            let prefix = format!("{}: ", c.name);
            let message = c
                .diagnostics
                .iter()
                .rev()
                .find_map(|d| d.strip_prefix(&prefix))
                .or(c.diagnostics.last().map(String::as_str))
                .unwrap_or("not ok");
            let _ = writeln!(
                x,
                "{open}>\n      <failure message=\"{}\" type=\"ktap\">{}</failure>\n    </testcase>",
                escape(message),
                escape(&c.diagnostics.join("\n"))
            );
        }
    }
}

/// The JUnit document for `report`; `errors` (empty for a complete report) become the `hil`
/// suite's error; `seconds` is the run's wall-clock time.
pub fn document(report: &Report, errors: &[String], seconds: f64) -> String {
    let count = |cases: &[&CaseResult]| {
        let failed = cases.iter().filter(|c| c.status == Status::Fail).count();
        let skipped = cases.iter().filter(|c| matches!(c.status, Status::Skip(_))).count();
        (cases.len(), failed, skipped)
    };
    let all: Vec<&CaseResult> = report.cases.iter().collect();
    let (tests, failures, skipped) = count(&all);
    let nerr = usize::from(!errors.is_empty());
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"dmakern\" tests=\"{}\" failures=\"{failures}\" errors=\"{nerr}\" skipped=\"{skipped}\" time=\"{seconds:.3}\">",
        tests + nerr
    );
    for suite in suite_order(report) {
        let cases: Vec<&CaseResult> = report.cases.iter().filter(|c| c.suite == suite).collect();
        let (t, f, s) = count(&cases);
        let _ = writeln!(x, "  <testsuite name=\"{}\" tests=\"{t}\" failures=\"{f}\" errors=\"0\" skipped=\"{s}\">", escape(&suite));
        for c in cases {
            write_case(&mut x, c);
        }
        x.push_str("  </testsuite>\n");
    }
    if !errors.is_empty() {
        let _ = writeln!(
            x,
            "  <testsuite name=\"hil\" tests=\"1\" failures=\"0\" errors=\"1\" skipped=\"0\">\n    <testcase classname=\"dmakern.hil\" name=\"complete_report\">\n      <error message=\"{}\" type=\"incomplete\">{}</error>\n    </testcase>\n  </testsuite>",
            escape(&errors[0]),
            escape(&errors.join("\n"))
        );
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmakern::ktest::parse::parse;

    const LOG: &str = "noise <&>\nKTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: a\n    1..3\n    ok 1 x\n    # y: src/a.rs:3: 1 != 2 <bad> & \"worse\"\n    not ok 2 y\n    ok 3 z # SKIP no \"device\"\nnot ok 1 a\n    KTAP version 1\n    # Subtest: b\n    1..1\n    ok 1 w\nok 2 b\ndmakern: 2 passed, 1 failed, 1 skipped\n";

    #[test]
    fn suites_cases_failures_and_skips() {
        let x = document(&parse(LOG), &[], 1.5);
        let expected = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<testsuites name=\"dmakern\" tests=\"4\" failures=\"1\" errors=\"0\" skipped=\"1\" time=\"1.500\">
  <testsuite name=\"a\" tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\">
    <testcase classname=\"dmakern.a\" name=\"x\"/>
    <testcase classname=\"dmakern.a\" name=\"y\">
      <failure message=\"src/a.rs:3: 1 != 2 &lt;bad&gt; &amp; &quot;worse&quot;\" type=\"ktap\">y: src/a.rs:3: 1 != 2 &lt;bad&gt; &amp; &quot;worse&quot;</failure>
    </testcase>
    <testcase classname=\"dmakern.a\" name=\"z\">
      <skipped message=\"no &quot;device&quot;\"/>
    </testcase>
  </testsuite>
  <testsuite name=\"b\" tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"0\">
    <testcase classname=\"dmakern.b\" name=\"w\"/>
  </testsuite>
</testsuites>
";
        assert_eq!(x, expected);
    }

    #[test]
    fn incomplete_report_adds_an_error_and_keeps_crashed_suites() {
        let crash = "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: a\n    1..2\n    ok 1 x\n    not ok 2 y\n# panicked in a.y\nBail out! panic\n";
        let x = document(&parse(crash), &["Bail out! panic".into(), "no summary".into()], 0.0);
        assert!(x.contains("<testsuites name=\"dmakern\" tests=\"3\" failures=\"1\" errors=\"1\" skipped=\"0\""), "{x}");
        assert!(x.contains("<testsuite name=\"a\" tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("<error message=\"Bail out! panic\" type=\"incomplete\">Bail out! panic\nno summary</error>"), "{x}");
        assert!(x.contains("<failure message=\"not ok\""), "{x}");
    }

    #[test]
    fn escaping_keeps_the_document_well_formed() {
        assert_eq!(escape("a<b>&'\"c"), "a&lt;b&gt;&amp;&apos;&quot;c");
        assert_eq!(escape("bell\u{7}\tok\r\n"), "bell\u{fffd}\tok\r\n");
        assert_eq!(escape("Zoë ✓"), "Zoë ✓");
    }
}
