//! Loss and validation-perplexity plots of a run's metrics.jsonl, as SVG.

use crate::train::{read_metrics, Metric};
use candle_core::{bail, Result};
use plotters::prelude::*;
use std::path::Path;

fn err<E: std::fmt::Display>(e: E) -> candle_core::Error {
    candle_core::Error::Msg(format!("plot: {e}"))
}

/// Writes `out` (SVG): training loss (raw and smoothed) with validation loss, and validation perplexity,
/// against tokens seen. Several runs can be drawn together with [`plot_runs`].
pub fn plot_run(metrics: &Path, out: &Path) -> Result<()> {
    let name = metrics.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    plot_runs(&[(name, read_metrics(metrics)?)], out)
}

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(255, 127, 14), RGBColor(23, 190, 207)];

pub fn plot_runs(runs: &[(String, Vec<Metric>)], out: &Path) -> Result<()> {
    if runs.iter().all(|(_, m)| m.is_empty()) {
        bail!("plot: no metrics to draw");
    }
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(560);
        let xmax = runs.iter().flat_map(|(_, m)| m.iter().map(|x| x.tokens as f64 / 1e6)).fold(0f64, f64::max).max(1e-6);
        let losses: Vec<f64> = runs.iter().flat_map(|(_, m)| m.iter().filter_map(|x| x.loss.or(x.val_loss))).filter(|v| v.is_finite()).collect();
        let ymax = losses.iter().cloned().fold(0f64, f64::max).min(8.0).max(0.1);
        let ymin = losses.iter().cloned().fold(f64::MAX, f64::min).max(0.0) * 0.9;
        let mut c = ChartBuilder::on(&left)
            .caption("loss (nats/token)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..xmax, ymin..ymax)
            .map_err(err)?;
        c.configure_mesh().x_desc("tokens (M)").y_desc("loss").draw().map_err(err)?;
        for (i, (name, m)) in runs.iter().enumerate() {
            let col = COLORS[i % COLORS.len()];
            let train: Vec<(f64, f64)> = m.iter().filter_map(|x| x.loss.map(|l| (x.tokens as f64 / 1e6, l))).collect();
            let mut ema = None;
            let smooth: Vec<(f64, f64)> = train
                .iter()
                .map(|&(x, y)| {
                    let e = ema.map_or(y, |e: f64| 0.95 * e + 0.05 * y);
                    ema = Some(e);
                    (x, e)
                })
                .collect();
            c.draw_series(LineSeries::new(train, col.mix(0.2))).map_err(err)?;
            c.draw_series(LineSeries::new(smooth, col.stroke_width(2))).map_err(err)?.label(format!("{name} train")).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], col.stroke_width(2)));
            let val: Vec<(f64, f64)> = m.iter().filter_map(|x| x.val_loss.map(|l| (x.tokens as f64 / 1e6, l))).collect();
            c.draw_series(LineSeries::new(val.clone(), ShapeStyle::from(col).stroke_width(1))).map_err(err)?;
            c.draw_series(val.iter().map(|&p| Circle::new(p, 3, col.filled()))).map_err(err)?.label(format!("{name} val")).legend(move |(x, y)| Circle::new((x + 7, y), 3, col.filled()));
        }
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
        let ppl: Vec<f64> = runs.iter().flat_map(|(_, m)| m.iter().filter_map(|x| x.val_ppl)).collect();
        if !ppl.is_empty() {
            let pmax = ppl.iter().cloned().fold(0f64, f64::max).min(1e4);
            let pmin = ppl.iter().cloned().fold(f64::MAX, f64::min);
            let mut c2 = ChartBuilder::on(&right)
                .caption("validation perplexity", ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(45)
                .build_cartesian_2d(0f64..xmax, (pmin * 0.95)..(pmax * 1.05))
                .map_err(err)?;
            c2.configure_mesh().x_desc("tokens (M)").y_desc("perplexity").draw().map_err(err)?;
            for (i, (_, m)) in runs.iter().enumerate() {
                let col = COLORS[i % COLORS.len()];
                let val: Vec<(f64, f64)> = m.iter().filter_map(|x| x.val_ppl.map(|p| (x.tokens as f64 / 1e6, p))).collect();
                c2.draw_series(LineSeries::new(val.clone(), col.stroke_width(2))).map_err(err)?;
                c2.draw_series(val.iter().map(|&p| Circle::new(p, 3, col.filled()))).map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
    Ok(())
}

/// One chart of [`plot_panels`]: named (x, y) series, optionally on a log-scale y axis.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub log_y: bool,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Side-by-side line charts (with markers) as one SVG, written atomically.
pub fn plot_panels(panels: &[Panel], out: &Path) -> Result<()> {
    if panels.is_empty() || panels.iter().all(|p| p.series.iter().all(|s| s.1.is_empty())) {
        bail!("plot: no points to draw");
    }
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (480 * panels.len() as u32, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (area, p) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            let pts: Vec<(f64, f64)> = p.series.iter().flat_map(|s| s.1.iter().cloned()).filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0)).collect();
            if pts.is_empty() {
                continue;
            }
            let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), &(x, _)| (a.min(x), b.max(x)));
            let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), &(_, y)| (a.min(y), b.max(y)));
            let xr = if x1 > x0 { x0..x1 } else { x0 - 1.0..x1 + 1.0 };
            let mut builder = ChartBuilder::on(area);
            let c = builder.caption(&p.title, ("sans-serif", 16)).margin(10).x_label_area_size(35).y_label_area_size(55);
            let col = |i: usize| COLORS[i % COLORS.len()];
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut ch = $chart;
                    ch.configure_mesh().x_desc(p.x_desc.as_str()).y_desc(p.y_desc.as_str()).draw().map_err(err)?;
                    for (i, (name, s)) in p.series.iter().enumerate() {
                        let s: Vec<(f64, f64)> = s.iter().cloned().filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0)).collect();
                        let cl = col(i);
                        ch.draw_series(LineSeries::new(s.clone(), cl.stroke_width(2))).map_err(err)?.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], cl.stroke_width(2)));
                        ch.draw_series(s.iter().map(|&q| Circle::new(q, 3, cl.filled()))).map_err(err)?;
                    }
                    ch.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
                }};
            }
            if p.log_y {
                draw!(c.build_cartesian_2d(xr, (y0 * 0.8..y1 * 1.25).log_scale()).map_err(err)?);
            } else {
                let pad = ((y1 - y0) * 0.05).max(1e-12);
                draw!(c.build_cartesian_2d(xr, y0 - pad..y1 + pad).map_err(err)?);
            }
        }
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))
}
