//! `inspect` with a stand-in walk: a text file whose lines are samples
//! (`field=v,v;field=v`), problems (`!place|reason`), facts (`@key|value`) or a walk that
//! stops (`STOP reason`).

use std::path::Path;

use quarry_formats::{DatasetError, Format, Observer};

use super::png::{BLUE, GREEN, INK, ORANGE, RED, WHITE};
use super::*;

fn fake_examine(_f: Format, path: &Path, obs: &mut dyn Observer) -> Result<u64, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(DatasetError::io("read", path))?;
    let name = file_name(path);
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if let Some(p) = line.strip_prefix('!') {
            let (place, reason) = p.split_once('|').expect("place|reason");
            obs.problem(&format!("{name}:{place}"), reason);
        } else if let Some(f) = line.strip_prefix('@') {
            let (key, value) = f.split_once('|').expect("key|value");
            obs.fact(key, value);
        } else if let Some(reason) = line.strip_prefix("STOP ") {
            return Err(DatasetError::invalid(
                format!("{name}:line {}", i + 1),
                reason,
            ));
        } else {
            obs.sample(n);
            n += 1;
            for part in line.split(';').filter(|p| !p.is_empty()) {
                let (field, vals) = part.split_once('=').expect("field=values");
                let vals: Vec<f64> = vals
                    .split(',')
                    .map(|v| v.parse().expect("a number"))
                    .collect();
                obs.values(field, &vals);
            }
        }
    }
    Ok(n)
}

fn args(path: &Path) -> InspectArgs {
    InspectArgs {
        path: path.to_path_buf(),
        format: Some(Format::Jsonl),
        png: None,
        json: false,
        bins: 20,
    }
}

fn samples(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "E_pen={};steps={};qpos={},{},{};energy={}\n",
                i as f64 * 0.01,
                i % 4,
                i,
                -(i as i64),
                i * 2,
                (i * 7 % 13) as f64 - 6.5
            )
        })
        .collect()
}

#[test]
fn a_valid_dataset_gets_a_table_and_exit_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("final.jsonl");
    std::fs::write(&p, samples(100)).expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    assert!(o.valid);
    assert_eq!(o.exit_code(), EXIT_VALID);
    assert_eq!((o.mode, o.samples, o.problem_count), ("dataset", 100, 0));
    assert_eq!(o.name, "final.jsonl");
    let text = render_text(&o);
    assert!(text.contains("status   valid"), "{text}");
    assert!(text.contains("samples  100"), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name} in\n{text}"))
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // field kind samples count nan inf min mean max
    assert_eq!(
        row("E_pen"),
        [
            "E_pen", "scalar", "100", "100", "0", "0", "0", "0.495", "0.99"
        ]
    );
    assert_eq!(
        row("qpos"),
        [
            "qpos", "array[3]", "100", "300", "0", "0", "-99", "33", "198"
        ]
    );
    // Columns line up: every row's "count" column ends at the same place.
    let header = text
        .lines()
        .find(|l| l.starts_with("field"))
        .expect("header");
    let end = header.find("count").expect("count") + "count".len();
    for name in ["E_pen", "steps", "qpos", "energy"] {
        let line = text.lines().find(|l| l.starts_with(name)).expect("row");
        assert_eq!(&line[end..end + 1], " ", "{line}");
        assert_ne!(&line[end - 1..end], " ", "{line}");
    }
    // JSON: histograms for the per-sample fields only.
    let j = serde_json::to_value(&o).expect("json");
    assert_eq!(j["valid"], true);
    assert_eq!(j["fields"][0]["name"], "E_pen");
    let h = j["fields"][0]["histogram"]["counts"]
        .as_array()
        .expect("histogram");
    assert_eq!(h.len(), 20);
    assert_eq!(
        h.iter().map(|c| c.as_u64().expect("count")).sum::<u64>(),
        100
    );
    assert_eq!(
        j["fields"][1]["histogram"]["counts"],
        serde_json::json!([25, 25, 25, 25])
    );
    assert!(j["fields"][2].get("histogram").is_none());
}

#[test]
fn problems_make_a_dataset_invalid_and_are_listed_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.jsonl");
    let mut text = samples(3);
    for i in 0..25 {
        text.push_str(&format!("!line {i}|energy is not a number\n"));
    }
    std::fs::write(&p, text).expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    assert!(!o.valid);
    assert_eq!(o.exit_code(), EXIT_INVALID);
    assert_eq!(o.problem_count, 25);
    let text = render_text(&o);
    assert!(text.contains("INVALID: 25 problem(s)"), "{text}");
    assert!(
        text.contains("  bad.jsonl:line 0: energy is not a number\n"),
        "{text}"
    );
    assert!(text.contains("  bad.jsonl:line 19: energy"), "{text}");
    assert!(!text.contains("line 20:"), "{text}");
    assert!(text.contains("... and 5 more"), "{text}");
}

#[test]
fn a_walk_that_stops_is_a_problem_at_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("cut.jsonl");
    std::fs::write(&p, format!("{}STOP truncated line\n", samples(2))).expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    assert!(!o.valid);
    assert_eq!(o.samples, 2);
    assert_eq!(o.problems[0].path, "cut.jsonl:line 3");
    assert_eq!(o.problems[0].reason, "truncated line");
    assert!(render_text(&o).contains("cut.jsonl:line 3: truncated line"));
}

#[test]
fn usage_errors_are_told_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing =
        inspect(&args(&dir.path().join("nope.npy")), fake_examine).expect_err("no such path");
    assert_eq!(missing.exit_code(), EXIT_USAGE);
    assert!(missing.to_string().contains("no such file"), "{missing}");
    let p = dir.path().join("mystery.bin");
    std::fs::write(&p, b"\0\0\0").expect("write");
    let mut a = args(&p);
    a.format = None;
    let e = inspect(&a, fake_examine).expect_err("unknown format");
    assert_eq!(e.exit_code(), EXIT_USAGE);
    assert!(e.to_string().contains("--format"), "{e}");
    assert!(parse_format("npy").is_ok());
    assert!(parse_format("csv").expect_err("unknown").contains("jsonl"));
}

/// An experiment directory: `<tmp>/exp/manifest.json`, finals under `<tmp>/exp/final/`.
fn experiment(dir: &Path) -> PathBuf {
    let exp = dir.join("exp");
    std::fs::create_dir_all(exp.join("final")).expect("mkdir");
    std::fs::write(exp.join("final/a.jsonl"), samples(40)).expect("write");
    std::fs::write(exp.join("final/b.jsonl"), samples(30)).expect("write");
    let manifest = serde_json::json!({
        "exp_name": "exp",
        "object_code_list": ["b", "a", "c", "d"],
        "target_count_per_object": 40,
        "state": "incomplete",
        "some_future_field": {"x": 1},
        "objects": {
            "a": {"collected": 40, "final": ["exp/final/a.jsonl"], "done": true,
                   "attempts": 100, "successes": 40, "filtered": 3, "duplicates": 1},
            "b": {"collected": 31, "final": ["exp/final/b.jsonl"], "done": true,
                   "success_rate": 0.25},
            "c": {"collected": 10, "final": [], "done": false},
            "d": {"collected": 5, "final": ["exp/final/d.jsonl"], "done": true},
        }
    });
    std::fs::write(exp.join("manifest.json"), manifest.to_string()).expect("write");
    exp
}

#[test]
fn an_experiment_reports_every_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exp = experiment(dir.path());
    let mut a = args(&exp);
    a.format = None; // told from the final's name
    let o = inspect(&a, fake_examine).expect("inspect");
    assert_eq!(o.mode, "experiment");
    assert_eq!(o.name, "exp");
    assert_eq!(o.samples, 70);
    let e = o.experiment.as_ref().expect("experiment");
    let names: Vec<&str> = e.objects.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(names, ["b", "a", "c", "d"], "the job's order");
    let (b, a, c, d) = (&e.objects[0], &e.objects[1], &e.objects[2], &e.objects[3]);
    assert_eq!(
        a.yield_,
        Some(Yield {
            value: 0.4,
            basis: "success_rate"
        })
    );
    assert_eq!(
        b.yield_,
        Some(Yield {
            value: 0.25,
            basis: "success_rate"
        })
    );
    assert_eq!(
        c.yield_,
        Some(Yield {
            value: 0.25,
            basis: "collected/quota"
        })
    );
    assert_eq!(
        (a.filtered, a.duplicates, b.filtered),
        (Some(3), Some(1), None)
    );
    assert!(a.dataset.as_ref().expect("a").valid);
    assert!(c.dataset.is_none(), "no final yet is not a problem");
    // b's final holds 30 samples, the manifest says 31; d's final is missing.
    assert!(!b.dataset.as_ref().expect("b").valid);
    assert!(!d.dataset.as_ref().expect("d").valid);
    assert!(!o.valid);
    assert_eq!(o.exit_code(), EXIT_INVALID);
    assert_eq!(o.problem_count, 2);
    let text = render_text(&o);
    assert!(
        text.contains("holds 30 samples but the manifest records collected = 31"),
        "{text}"
    );
    assert!(
        text.contains("d.jsonl: the manifest lists this final but it does not exist"),
        "{text}"
    );
    assert!(text.contains("fields (all objects):"), "{text}");
    let row = text.lines().find(|l| l.starts_with("a ")).expect("row a");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["a", "40", "40", "100", "40", "40%", "3", "1", "valid"]
    );
    let row = text.lines().find(|l| l.starts_with("c ")).expect("row c");
    assert!(
        row.contains("25% (of quota)") && row.ends_with("no final"),
        "{row}"
    );
    // Statistics of both finals together.
    let e_pen = o.fields.iter().find(|f| f.name == "E_pen").expect("E_pen");
    assert_eq!(e_pen.count, 70);
    assert_eq!(e_pen.histogram.as_ref().expect("histogram").total(), 70);
    let j = serde_json::to_value(&o).expect("json");
    assert_eq!(j["experiment"]["objects"][1]["yield"]["value"], 0.4);
    assert_eq!(j["experiment"]["objects"][1]["dataset"]["samples"], 40);
}

#[test]
fn the_png_report_is_drawn_and_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exp = experiment(dir.path());
    let png_path = dir.path().join("report.png");
    let mut a = args(&exp);
    a.png = Some(png_path.clone());
    let o = run_with(&a, fake_examine).expect("run");
    let c = chart::render(&o);
    assert_eq!((c.width(), c.height()), (chart::WIDTH, chart::height(&o)));
    // 3 histograms (E_pen, energy, steps; qpos is an array): one row; then the yield chart.
    let panels: Vec<&str> = chart::panel_fields(&o.fields)
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(panels, ["E_pen", "energy", "steps"]);
    assert_eq!(c.height(), (50 + 220 + 260 + 10) as usize);
    let count = |color: u8| {
        (0..c.height())
            .flat_map(|y| (0..c.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| c.get(x, y) == Some(color))
            .count()
    };
    assert!(count(BLUE) > 1000, "histogram and success-rate bars");
    assert!(count(ORANGE) > 100, "the collected/quota bar of c");
    assert!(count(RED) > 0, "INVALID in the title");
    assert_eq!(count(GREEN), 0);
    assert!(count(WHITE) < c.width() * c.height());
    let bytes = std::fs::read(&png_path).expect("the PNG was written");
    assert_eq!(bytes, c.encode_png());
    assert_eq!(&bytes[..8], &png::SIGNATURE);
    assert_eq!(
        u32::from_be_bytes(bytes[16..20].try_into().expect("4")),
        1000
    );
    // The same input draws the same bytes.
    run_with(&a, fake_examine).expect("run");
    assert_eq!(std::fs::read(&png_path).expect("read"), bytes);
    // Writing into a missing directory is an error of its own kind.
    a.png = Some(dir.path().join("no/such/dir/r.png"));
    assert_eq!(
        run_with(&a, fake_examine)
            .expect_err("unwritable")
            .exit_code(),
        EXIT_ERROR
    );
}

#[test]
fn panels_put_energies_first_and_are_capped() {
    let mut line = String::new();
    for i in 0..15 {
        line.push_str(&format!("f{i}=1;"));
    }
    line.push_str("E_dis=2;total_energy=3;arr=1,2\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("many.jsonl");
    std::fs::write(&p, line.repeat(3)).expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    let names: Vec<&str> = chart::panel_fields(&o.fields)
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names.len(), chart::MAX_PANELS);
    assert_eq!(names[..3], ["E_dis", "total_energy", "f0"]);
    assert!(!names.contains(&"arr"));
    // A dataset without per-sample fields still draws (a note instead of histograms).
    std::fs::write(&p, "arr=1,2\n").expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    assert!(chart::panel_fields(&o.fields).is_empty());
    let c = chart::render(&o);
    assert_eq!(c.height(), (50 + 220 + 10) as usize);
}

#[test]
fn numbers_are_short() {
    assert_eq!(fmt_num(0.0, 4), "0");
    assert_eq!(fmt_num(0.125, 4), "0.125");
    assert_eq!(fmt_num(1250.0, 4), "1250");
    assert_eq!(fmt_num(-4.56789, 4), "-4.568");
    assert_eq!(fmt_num(0.495, 6), "0.495");
    assert_eq!(fmt_num(1.2e-5, 3), "1.2e-5");
    assert_eq!(fmt_num(2.5e7, 4), "2.5e7");
    assert_eq!(fmt_num(999.96, 4), "1000");
    assert_eq!(fmt_num(f64::NAN, 4), "NaN");
}

#[test]
fn facts_are_listed_in_order_a_repeated_key_replacing_its_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("d.txt");
    std::fs::write(&p, "@fps|10\nx=1\n@tasks|2: a, b\n@fps|30\nx=2\n").expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    let facts: Vec<(&str, &str)> = o
        .facts
        .iter()
        .map(|f| (f.key.as_str(), f.value.as_str()))
        .collect();
    assert_eq!(facts, [("fps", "30"), ("tasks", "2: a, b")]);
    assert!(o.valid);
    let text = render_text(&o);
    assert!(
        text.contains("\ndataset:\n  fps    30\n  tasks  2: a, b\n"),
        "{text}"
    );
    let json = serde_json::to_value(&o).expect("json");
    assert_eq!(json["facts"][1]["key"], "tasks");
    // A walk without facts prints no such block, and its JSON no `facts`.
    std::fs::write(&p, "x=1\n").expect("write");
    let o = inspect(&args(&p), fake_examine).expect("inspect");
    assert!(!render_text(&o).contains("dataset:"));
    assert!(
        serde_json::to_value(&o)
            .expect("json")
            .get("facts")
            .is_none()
    );
}

#[test]
fn the_png_report_shows_the_facts_in_a_band_under_the_title() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("one.jsonl");
    std::fs::write(&p, "E_pen=1;steps=2\n".repeat(3)).expect("write");
    let mut o = inspect(&args(&p), fake_examine).expect("inspect");
    let plain = chart::render(&o);
    assert_eq!(plain.height(), (50 + 220 + 10) as usize);
    let fact = |k: &str, v: &str| stats::Fact {
        key: k.into(),
        value: v.into(),
    };
    o.facts = vec![fact("fps", "30"), fact("tasks", "1: pick the cube")];
    let c = chart::render(&o);
    // Two lines of 12 px and the band's margins, between the title and the histograms.
    assert_eq!(c.height(), (50 + 2 * 12 + 20 + 220 + 10) as usize);
    assert_eq!(c.height(), chart::height(&o));
    let ink_in = |c: &png::Canvas, y0: usize, y1: usize| {
        (y0..y1)
            .flat_map(|y| (0..c.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| c.get(x, y) == Some(INK))
            .count()
    };
    assert!(ink_in(&c, 50, 50 + 24 + 10) > 50, "the facts' text");
    // Many facts: capped, the last line counting the rest.
    o.facts = (0..40).map(|i| fact(&format!("k{i}"), "v")).collect();
    let c = chart::render(&o);
    let band = chart::MAX_FACT_LINES * 12 + 20;
    assert_eq!(c.height(), 50 + band + 220 + 10);
}
