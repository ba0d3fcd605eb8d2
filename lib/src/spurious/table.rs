//! Spurious-feature tables: per class, one row per feature with its label, score, margin, the
//! nearest tokens of its soft prompt and thumbnails (images, mask overlays, heatmaps).
//!
//! A [`ClassTable`] renders in a notebook as a cell's last expression (HTML with base64 PNG
//! thumbnails and a tab-separated text/plain fallback, through [`crate::display`]) and exports
//! HTML, CSV and JSON. [`ClassTable::save`] writes a folder:
//!
//! ```text
//! DIR/labels.json              the table (class, query, rule, rows)
//! DIR/labels.csv               the rows (one per feature)
//! DIR/table.html               the table with its thumbnails embedded
//! DIR/feature{F}/image_{i}.png     the i-th generated image for feature F
//! DIR/feature{F}/mask_{i}.png      the object mask (gray, 255 = object)
//! DIR/feature{F}/overlay_{i}.png   the image with the mask in red
//! DIR/feature{F}/heatmap_{i}.png   the activation map, scaled to its maximum, viridis colours
//! DIR/feature{F}/activation_{i}.png the activation map scaled to its maximum, gray
//! ```
//!
//! and [`ClassTable::load`] reads it back (the evidence as images in `[0, 1]`; the activation
//! maps come back scaled to their maximum, which leaves every share unchanged).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::labelling::{LabelRule, Verdict};
use crate::display::{self, html_escape, Display};

/// One (class, feature) pair's result. Every field is a scalar or text, so a row is one CSV
/// line; `shares` is written `0.81;0.77;-` (`-`: the feature did not fire on that image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    pub class_index: usize,
    pub class_name: String,
    pub feature: usize,
    /// The feature's rank for the class: its position in the list labelled (1 = first given /
    /// most predictive), or the annotation's own rank (`Input.feature_rank` of Salient
    /// ImageNet's CSV) when the features came from there.
    pub rank: usize,
    pub label: Verdict,
    /// Mean object share over the images where the feature fires.
    pub score: Option<f64>,
    /// Half-width of the t interval around `score`.
    pub margin: Option<f64>,
    /// The share `score − margin` must reach to be core: the rule's criterion at the mean mask
    /// area of the images where the feature fires (`None` when it fires on none).
    #[serde(default)]
    pub share_threshold: Option<f64>,
    /// Generated images, and those where the feature fires.
    pub images: usize,
    pub active_images: usize,
    /// Per-image object shares.
    #[serde(with = "shares_text")]
    pub shares: Vec<Option<f64>>,
    /// The explainer's best objective (the mean feature activation, plus the weighted class
    /// logit if the run included it).
    pub objective: f64,
    /// The template with each soft vector's nearest token.
    pub prompt: String,
    /// Each soft vector's nearest tokens with their cosines, `v0: a (0.41), b (0.39); v1: ...`.
    pub nearest_tokens: String,
}

/// The pixels behind a row: what the thumbnails show.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// Generated images `[n, 3, H, W]` in `[0, 1]`, f32 on the CPU.
    pub images: Tensor,
    /// Object masks `[n, H, W]` in `[0, 1]`.
    pub masks: Tensor,
    /// The feature's activation maps `[n, H, W]` (>= 0).
    pub maps: Tensor,
}

/// A class's table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassTable {
    pub class_index: usize,
    pub class_name: String,
    /// The segmentation query (the class name in the query template).
    pub query: String,
    pub rule: LabelRule,
    pub rows: Vec<LabelRow>,
    /// Per row, its pixels (absent in a table read from JSON alone).
    #[serde(skip)]
    pub evidence: Vec<Option<Evidence>>,
}

mod shares_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(shares: &[Option<f64>], s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = shares
            .iter()
            .map(|v| v.map_or("-".to_string(), |v| v.to_string()))
            .collect();
        s.serialize_str(&text.join(";"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<f64>>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(';')
            .map(|v| match v.trim() {
                "-" => Ok(None),
                v => v.parse::<f64>().map(Some).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "shares: {v:?} is neither a number nor `-` (in {text:?})"
                    ))
                }),
            })
            .collect()
    }
}

/// File names of the saved tables.
pub const JSON_FILE: &str = "labels.json";
pub const CSV_FILE: &str = "labels.csv";
pub const HTML_FILE: &str = "table.html";

const THUMB: usize = 64;

impl ClassTable {
    /// The rows as CSV (header line first).
    pub fn to_csv(&self) -> anyhow::Result<String> {
        rows_to_csv(&self.rows)
    }

    pub fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// A table read from [`Self::to_json`]'s text (without evidence).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let mut t: Self = serde_json::from_str(text).context("not a spurious-feature table")?;
        t.evidence = vec![None; t.rows.len()];
        Ok(t)
    }

    /// The HTML table with its thumbnails as `data:image/png;base64` images (what the notebook
    /// shows and `table.html` holds).
    pub fn to_html(&self) -> anyhow::Result<String> {
        let mut html = format!(
            "<div class=\"diffexplainer-spurious\"><div><b>class {} ({})</b>: query <code>{}</code>; \
             core when the {} for score − margin (the share in <i>core if ≥</i>), spurious when \
             score + margin falls short ({}% t interval)</div>\
             <table><thead><tr><th>rank</th><th>feature</th><th>label</th><th>score</th>\
             <th>margin</th><th>core if ≥</th><th>active</th><th>nearest tokens</th><th>images</th>\
             <th>mask overlays</th><th>heatmaps</th></tr></thead><tbody>",
            self.class_index,
            html_escape(&self.class_name),
            html_escape(&self.query),
            html_escape(&self.rule.core.describe()),
            100.0 * self.rule.confidence
        );
        for (k, row) in self.rows.iter().enumerate() {
            let colour = match row.label {
                Verdict::Core => "#1a7f37",
                Verdict::Spurious => "#cf222e",
                Verdict::Uncertain => "#9a6700",
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td style=\"color:{colour}\"><b>{}</b></td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}/{}</td><td><code>{}</code><br/><small>{}</small></td>",
                row.rank,
                row.feature,
                row.label,
                fmt_opt(row.score),
                row.margin.map_or("–".to_string(), |m| format!("±{m:.3}")),
                fmt_opt(row.share_threshold),
                row.active_images,
                row.images,
                html_escape(&row.prompt),
                html_escape(&row.nearest_tokens)
            );
            match self.evidence.get(k).and_then(Option::as_ref) {
                Some(ev) => {
                    for (name, pngs) in [
                        ("image", ev.image_pngs()?),
                        ("overlay", ev.overlay_pngs()?),
                        ("heatmap", ev.heatmap_pngs()?),
                    ] {
                        html.push_str("<td>");
                        for (i, png) in pngs.iter().enumerate() {
                            let _ = write!(
                                html,
                                "<img alt=\"feature {} {name} {i}\" width=\"{THUMB}\" \
                                 src=\"data:image/png;base64,{}\"/>",
                                row.feature,
                                display::base64(png)
                            );
                        }
                        html.push_str("</td>");
                    }
                }
                None => html.push_str("<td>–</td><td>–</td><td>–</td>"),
            }
            html.push_str("</tr>");
        }
        html.push_str("</tbody></table></div>");
        Ok(html)
    }

    /// The text fallback: one tab-separated line per row.
    pub fn to_text(&self) -> String {
        let headers = [
            "rank",
            "feature",
            "label",
            "score",
            "margin",
            "core if ≥",
            "active",
            "prompt",
        ];
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.rank.to_string(),
                    r.feature.to_string(),
                    r.label.to_string(),
                    fmt_opt(r.score),
                    fmt_opt(r.margin),
                    fmt_opt(r.share_threshold),
                    format!("{}/{}", r.active_images, r.images),
                    r.prompt.clone(),
                ]
            })
            .collect();
        let table = display::table(&headers, &rows);
        format!(
            "class {} ({}), query {:?}\n{}",
            self.class_index,
            self.class_name,
            self.query,
            table.get("text/plain").unwrap_or_default()
        )
    }

    /// The notebook rendering: HTML with thumbnails, text fallback.
    pub fn display(&self) -> anyhow::Result<Display> {
        Ok(Display::new().text(self.to_text()).html(self.to_html()?))
    }

    /// Called by evcxr when the table is a cell's last expression.
    pub fn evcxr_display(&self) {
        match self.display() {
            Ok(d) => d.evcxr_display(),
            Err(e) => Display::new()
                .text(format!("<spurious table error: {e:#}>"))
                .evcxr_display(),
        }
    }

    /// Writes the folder described in the module docs. `dir` must not exist or be empty, so a
    /// table never mixes with another's files.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        check_output_dir(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
            crate::io::write_bytes_atomically(&dir.join(name), bytes)
        };
        for (row, ev) in self.rows.iter().zip(&self.evidence) {
            let Some(ev) = ev else { continue };
            let sub = dir.join(format!("feature{}", row.feature));
            std::fs::create_dir_all(&sub)?;
            for (name, pngs) in [
                ("image", ev.image_pngs()?),
                ("mask", ev.mask_pngs()?),
                ("overlay", ev.overlay_pngs()?),
                ("heatmap", ev.heatmap_pngs()?),
                ("activation", ev.activation_pngs()?),
            ] {
                for (i, png) in pngs.iter().enumerate() {
                    crate::io::write_bytes_atomically(&sub.join(format!("{name}_{i}.png")), png)?;
                }
            }
        }
        write(CSV_FILE, self.to_csv()?.as_bytes())?;
        write(HTML_FILE, self.standalone_html()?.as_bytes())?;
        // Last: a folder with labels.json is complete.
        write(JSON_FILE, self.to_json()?.as_bytes())?;
        Ok(())
    }

    /// Reads a folder written by [`Self::save`], with its evidence where the PNGs are there.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(JSON_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read the table", path.display()))?;
        let mut table =
            Self::from_json(&text).with_context(|| format!("reading {}", path.display()))?;
        for (k, row) in table.rows.iter().enumerate() {
            let sub = dir.join(format!("feature{}", row.feature));
            if sub.join("image_0.png").is_file() {
                table.evidence[k] = Some(
                    Evidence::load(&sub, row.images)
                        .with_context(|| format!("evidence of feature {}", row.feature))?,
                );
            }
        }
        Ok(table)
    }

    fn standalone_html(&self) -> anyhow::Result<String> {
        Ok(format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\
             <style>table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;\
             vertical-align:top}}img{{margin:1px;image-rendering:pixelated}}</style></head>\
             <body>{}</body></html>\n",
            html_escape(&format!(
                "class {} ({}) features",
                self.class_index, self.class_name
            )),
            self.to_html()?
        ))
    }
}

/// Rows as CSV with a header line.
pub fn rows_to_csv(rows: &[LabelRow]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

/// Rows from CSV text written by [`rows_to_csv`]. A missing column or a bad value is an error
/// naming the line.
pub fn rows_from_csv(text: &str) -> anyhow::Result<Vec<LabelRow>> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let mut rows = Vec::new();
    for (i, rec) in r.deserialize::<LabelRow>().enumerate() {
        rows.push(rec.with_context(|| format!("labels CSV line {}", i + 2))?);
    }
    Ok(rows)
}

/// `dir` is usable for a new table: absent or an empty folder.
pub fn check_output_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("output {} is a file, not a folder", dir.display())
        }
        if std::fs::read_dir(dir)?.next().is_some() {
            bail!(
                "output folder {} is not empty: choose a new folder (a table is never mixed with \
                 other files)",
                dir.display()
            )
        }
    }
    Ok(())
}

/// Every table under `paths`: each path is a table folder (with `labels.json`) or a folder whose
/// direct subfolders are. Sorted by path.
pub fn find_tables(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, ClassTable)>> {
    let mut found = Vec::new();
    for p in paths {
        if p.join(JSON_FILE).is_file() {
            found.push(p.clone());
            continue;
        }
        if !p.is_dir() {
            bail!(
                "labels {} {}",
                p.display(),
                crate::io::why_unusable(p, true)
            )
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|s| s.join(JSON_FILE).is_file())
            .collect();
        if subs.is_empty() {
            bail!(
                "labels {}: no {JSON_FILE} there or in its subfolders (a folder written by \
                 `diffexplainer spurious label --out`)",
                p.display()
            )
        }
        subs.sort();
        found.extend(subs);
    }
    found
        .into_iter()
        .map(|dir| {
            let text = std::fs::read_to_string(dir.join(JSON_FILE))?;
            let t = ClassTable::from_json(&text)
                .with_context(|| format!("reading {}", dir.join(JSON_FILE).display()))?;
            Ok((dir, t))
        })
        .collect()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.3}"))
}

impl Evidence {
    fn n(&self) -> anyhow::Result<usize> {
        Ok(self.images.dim(0)?)
    }

    fn rgb(&self, i: usize) -> anyhow::Result<(usize, usize, Vec<f32>)> {
        let img = self.images.get(i)?.to_dtype(DType::F32)?;
        let (_, h, w) = img.dims3()?;
        Ok((h, w, img.permute((1, 2, 0))?.flatten_all()?.to_vec1()?))
    }

    fn plane(t: &Tensor, i: usize) -> anyhow::Result<Vec<f32>> {
        Ok(t.get(i)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// Map `i` divided by its maximum (all zeros stay zeros).
    fn scaled_map(&self, i: usize) -> anyhow::Result<Vec<f32>> {
        let m = Self::plane(&self.maps, i)?;
        let max = m.iter().cloned().fold(0.0f32, f32::max);
        Ok(if max > 0.0 {
            m.iter().map(|v| v / max).collect()
        } else {
            m
        })
    }

    fn pngs(
        &self,
        mut pixels: impl FnMut(usize) -> anyhow::Result<(usize, usize, usize, Vec<u8>)>,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        (0..self.n()?)
            .map(|i| {
                let (h, w, c, px) = pixels(i)?;
                Ok(display::encode_png(w, h, c, &px)?)
            })
            .collect()
    }

    pub fn image_pngs(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.pngs(|i| {
            let (h, w, rgb) = self.rgb(i)?;
            Ok((h, w, 3, rgb.iter().map(|v| to_u8(*v)).collect()))
        })
    }

    pub fn mask_pngs(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let (h, w) = (self.masks.dim(1)?, self.masks.dim(2)?);
        self.pngs(|i| {
            let m = Self::plane(&self.masks, i)?;
            Ok((h, w, 1, m.iter().map(|v| to_u8(*v)).collect()))
        })
    }

    /// The image with the mask blended in red at half strength.
    pub fn overlay_pngs(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.pngs(|i| {
            let (h, w, rgb) = self.rgb(i)?;
            let m = Self::plane(&self.masks, i)?;
            let mut px = Vec::with_capacity(rgb.len());
            for (p, a) in m.iter().enumerate() {
                let a = 0.5 * a.clamp(0.0, 1.0);
                for k in 0..3 {
                    let red = if k == 0 { 1.0 } else { 0.0 };
                    px.push(to_u8((1.0 - a) * rgb[3 * p + k] + a * red));
                }
            }
            Ok((h, w, 3, px))
        })
    }

    /// The activation map scaled to its maximum, in viridis colours.
    pub fn heatmap_pngs(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let (h, w) = (self.maps.dim(1)?, self.maps.dim(2)?);
        self.pngs(|i| {
            let m = self.scaled_map(i)?;
            Ok((h, w, 3, m.iter().flat_map(|v| viridis(*v)).collect()))
        })
    }

    /// The activation map scaled to its maximum, gray (what [`ClassTable::load`] reads back).
    pub fn activation_pngs(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let (h, w) = (self.maps.dim(1)?, self.maps.dim(2)?);
        self.pngs(|i| {
            let m = self.scaled_map(i)?;
            Ok((h, w, 1, m.iter().map(|v| to_u8(*v)).collect()))
        })
    }

    fn load(sub: &Path, n: usize) -> anyhow::Result<Self> {
        let read = |name: &str, i: usize, gray: bool| -> anyhow::Result<Tensor> {
            let path = sub.join(format!("{name}_{i}.png"));
            let img = image::open(&path).with_context(|| format!("{}", path.display()))?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (c, px) = if gray {
                (1, img.to_luma8().into_raw())
            } else {
                (3, img.to_rgb8().into_raw())
            };
            let t = Tensor::from_vec(px, (h, w, c), &Device::Cpu)?
                .to_dtype(DType::F32)?
                .affine(1.0 / 255.0, 0.0)?
                .permute((2, 0, 1))?;
            Ok(if gray { t.squeeze(0)? } else { t })
        };
        let stack = |name: &str, gray: bool| -> anyhow::Result<Tensor> {
            let v = (0..n)
                .map(|i| read(name, i, gray))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&v, 0)?)
        };
        Ok(Self {
            images: stack("image", false)?,
            masks: stack("mask", true)?,
            maps: stack("activation", true)?,
        })
    }
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Matplotlib's viridis, linearly between five of its colours.
fn viridis(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let x = v.clamp(0.0, 1.0) * 4.0;
    let k = (x.floor() as usize).min(3);
    let t = x - k as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (STOPS[k][c] * (1.0 - t) + STOPS[k + 1][c] * t).round() as u8;
    }
    out
}
