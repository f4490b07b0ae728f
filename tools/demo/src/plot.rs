//! The demo's plot: consumer lag (top) and worker replicas (bottom) per group over time.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::Sample;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `samples` into an SVG file at `path`.
pub fn draw(samples: &[Sample], path: &Path) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(400);

    let names: Vec<&String> = samples
        .last()
        .map(|s| s.groups.keys().collect())
        .unwrap_or_default();
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let lag_max = samples
        .iter()
        .flat_map(|s| s.groups.values().map(|g| g.lag))
        .max()
        .unwrap_or(0)
        .max(10) as f64;
    let replicas_max = samples
        .iter()
        .flat_map(|s| s.groups.values().map(|g| g.replicas.max(g.ready)))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let dead_lettered = samples.last().map_or(0, |s| s.dead_lettered);

    let mut lag = ChartBuilder::on(&top)
        .caption(
            format!("Consumer lag per group (dead-lettered at the end: {dead_lettered})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..lag_max * 1.05)
        .map_err(err)?;
    lag.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("seconds")
        .y_desc("records")
        .draw()
        .map_err(err)?;
    for (i, name) in names.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = samples
            .iter()
            .filter_map(|s| s.groups.get(*name).map(|g| (s.t, g.lag as f64)));
        lag.draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    lag.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    let mut replicas = ChartBuilder::on(&bottom)
        .caption(
            "Worker replicas (solid: Deployment spec, dashed: Ready)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..replicas_max + 1.0)
        .map_err(err)?;
    replicas
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(replicas_max as usize + 2)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("seconds")
        .y_desc("replicas")
        .draw()
        .map_err(err)?;
    for (i, name) in names.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let spec = steps(samples, name, |g| g.replicas);
        let ready = steps(samples, name, |g| g.ready);
        replicas
            .draw_series(LineSeries::new(spec, colour.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        replicas
            .draw_series(DashedLineSeries::new(ready, 6, 4, colour.stroke_width(1)))
            .map_err(err)?;
    }
    replicas
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A step line: a count holds its value until the next sample.
fn steps(
    samples: &[Sample],
    name: &str,
    value: impl Fn(&crate::GroupSample) -> i32,
) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut last: Option<f64> = None;
    for s in samples {
        if let Some(g) = s.groups.get(name) {
            let v = value(g) as f64;
            if let Some(prev) = last {
                points.push((s.t, prev));
            }
            points.push((s.t, v));
            last = Some(v);
        }
    }
    points
}
