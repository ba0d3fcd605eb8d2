//! The renderer: one object (shape, colour, texture, size) at a random position, scale and
//! rotation on a background (a plain colour or a procedural texture), anti-aliased by 4×4
//! supersampling, with the object's exact coverage mask.
//!
//! Deterministic on every machine: only integer hashing, IEEE arithmetic (+, −, ×, ÷, sqrt,
//! which are correctly rounded everywhere) and `libm`'s pure-Rust `sinf`/`cosf` (not the
//! platform's maths library). `tests/world_render.rs` pins a hash of rendered pixels.
//!
//! Pixel `p` is `background·(1 − m) + object·m` where `m` = the mask = the fraction of the
//! pixel's 16 subsamples inside the shape, and `object` is the mean object colour over those
//! subsamples; so `m = 1` pixels are pure object and `m = 0` pixels pure background.

use serde::{Deserialize, Serialize};

/// Shapes the renderer draws (class names).
pub const SHAPES: &[&str] = &["circle", "square", "triangle", "star", "heart", "cross"];
/// Object colours by name; RGB in [`color_rgb`].
pub const COLORS: &[&str] = &[
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
];
/// Object textures: flat, stripes (a darker band every few pixels, turning with the object),
/// dots (a lighter dot grid).
pub const TEXTURES: &[&str] = &["plain", "stripes", "dots"];
/// Backgrounds: plain colours and procedural textures.
pub const BACKGROUNDS: &[&str] = &[
    "gray", "beige", "grass", "water", "snow", "sand", "bricks", "sky",
];
/// Object sizes; nominal radius as a fraction of the image side in [`size_radius`].
pub const SIZES: &[&str] = &["small", "medium", "large"];

/// Subsamples per pixel side.
const SUPERSAMPLE: usize = 4;

/// One image's content: the attribute record plus the geometry that places the object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shape: String,
    pub color: String,
    pub texture: String,
    pub background: String,
    pub size: String,
    /// Object centre in pixels (x right, y down).
    pub center: [f32; 2],
    /// Circumradius in pixels.
    pub radius: f32,
    /// Rotation in radians (counter-clockwise on screen).
    pub rotation: f32,
    /// Seed of the background's procedural texture.
    pub background_seed: u64,
}

/// A rendered image: RGB bytes (row-major `[h, w, 3]`) and the object's coverage (`[h, w]` in
/// [0, 1]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub size: usize,
    pub rgb: Vec<u8>,
    pub mask: Vec<f32>,
}

pub fn color_rgb(name: &str) -> [f32; 3] {
    match name {
        "red" => [220.0, 40.0, 40.0],
        "green" => [40.0, 170.0, 60.0],
        "blue" => [40.0, 80.0, 225.0],
        "yellow" => [240.0, 210.0, 40.0],
        "purple" => [150.0, 60.0, 190.0],
        "orange" => [245.0, 140.0, 30.0],
        "white" => [245.0, 245.0, 245.0],
        "black" => [25.0, 25.0, 25.0],
        other => panic!("unknown colour `{other}` (the spec is validated against COLORS)"),
    }
}

/// Nominal circumradius as a fraction of the image side.
pub fn size_radius(name: &str) -> f32 {
    match name {
        "small" => 0.24,
        "medium" => 0.31,
        "large" => 0.38,
        other => panic!("unknown size `{other}` (the spec is validated against SIZES)"),
    }
}

/// Renders a scene at `size`×`size`.
pub fn render(scene: &Scene, size: usize) -> Rendered {
    render_with(scene, size, true)
}

/// Renders the background alone (the object removed): the mask is all zeros.
pub fn render_background(scene: &Scene, size: usize) -> Rendered {
    render_with(scene, size, false)
}

fn render_with(scene: &Scene, size: usize, with_object: bool) -> Rendered {
    let shape = ShapeTest::new(&scene.shape);
    let base = color_rgb(&scene.color);
    let (sin, cos) = (libm::sinf(scene.rotation), libm::cosf(scene.rotation));
    let inv_r = 1.0 / scene.radius;
    let mut rgb = vec![0u8; size * size * 3];
    let mut mask = vec![0f32; size * size];
    let n_sub = (SUPERSAMPLE * SUPERSAMPLE) as f32;
    for y in 0..size {
        for x in 0..size {
            let bg = background_rgb(&scene.background, scene.background_seed, x, y, size);
            let mut inside = 0usize;
            let mut obj = [0f32; 3];
            if with_object {
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let px = x as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32;
                        // Object frame: unrotate, scale to a unit circumradius, y up.
                        let dx = (px - scene.center[0]) * inv_r;
                        let dy = (py - scene.center[1]) * inv_r;
                        let u = cos * dx - sin * dy;
                        let v = -(sin * dx + cos * dy);
                        if shape.contains(u, v) {
                            inside += 1;
                            let c = texture_rgb(&scene.texture, base, u, v);
                            for k in 0..3 {
                                obj[k] += c[k];
                            }
                        }
                    }
                }
            }
            let m = inside as f32 / n_sub;
            let i = y * size + x;
            mask[i] = m;
            for k in 0..3 {
                let o = if inside > 0 {
                    obj[k] / inside as f32
                } else {
                    0.0
                };
                let value = bg[k] * (1.0 - m) + o * m;
                rgb[3 * i + k] = value.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Rendered { size, rgb, mask }
}

/// Point-in-shape tests in the object frame (unit circumradius, y up).
enum ShapeTest {
    Circle,
    Square,
    Polygon(Vec<[f32; 2]>),
    Heart,
    Cross,
}

impl ShapeTest {
    fn new(name: &str) -> Self {
        match name {
            "circle" => Self::Circle,
            "square" => Self::Square,
            "triangle" => Self::Polygon(star_polygon(3, 1.0, 1.0)),
            "star" => Self::Polygon(star_polygon(5, 1.0, 0.45)),
            "heart" => Self::Heart,
            "cross" => Self::Cross,
            other => panic!("unknown shape `{other}` (the spec is validated against SHAPES)"),
        }
    }

    fn contains(&self, u: f32, v: f32) -> bool {
        match self {
            Self::Circle => u * u + v * v <= 0.9 * 0.9,
            Self::Square => u.abs() <= 0.72 && v.abs() <= 0.72,
            Self::Polygon(p) => inside_polygon(p, u, v),
            Self::Heart => {
                // (x² + y² − 1)³ − x² y³ ≤ 0, spanning about [−1.14, 1.14] × [−1, 1.25].
                let x = u * 1.15;
                let y = v * 1.15 + 0.1;
                let a = x * x + y * y - 1.0;
                a * a * a - x * x * y * y * y <= 0.0
            }
            Self::Cross => {
                let (a, b) = (u.abs(), v.abs());
                (a <= 0.3 && b <= 0.9) || (b <= 0.3 && a <= 0.9)
            }
        }
    }
}

/// A regular polygon (`inner == outer`) or star with `points` tips, first tip pointing up.
fn star_polygon(points: usize, outer: f32, inner: f32) -> Vec<[f32; 2]> {
    let step = if inner == outer { 1 } else { 2 };
    let n = points * step;
    (0..n)
        .map(|i| {
            let r = if i % 2 == 1 && step == 2 {
                inner
            } else {
                outer
            };
            let a = std::f32::consts::FRAC_PI_2 + std::f32::consts::TAU * i as f32 / n as f32;
            [r * libm::cosf(a), r * libm::sinf(a)]
        })
        .collect()
}

/// Even-odd crossing test.
fn inside_polygon(p: &[[f32; 2]], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = p.len() - 1;
    for i in 0..p.len() {
        let ([xi, yi], [xj, yj]) = (p[i], p[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The object's colour at object-frame point (u, v): the texture turns with the object.
fn texture_rgb(texture: &str, base: [f32; 3], u: f32, v: f32) -> [f32; 3] {
    match texture {
        "plain" => base,
        "stripes" => {
            // Diagonal bands, 0.4 circumradius apart, the darker third of each.
            let t = (u + v) * 2.5;
            if t - t.floor() < 0.4 {
                mix(base, [0.0; 3], 0.6)
            } else {
                base
            }
        }
        "dots" => {
            let (a, b) = (u * 3.0, v * 3.0);
            let (fa, fb) = (a - a.floor() - 0.5, b - b.floor() - 0.5);
            if fa * fa + fb * fb < 0.09 {
                mix(base, [255.0; 3], 0.7)
            } else {
                base
            }
        }
        other => panic!("unknown texture `{other}` (the spec is validated against TEXTURES)"),
    }
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// A hash of integers to [0, 1) (SplitMix64's finalizer).
fn hash01(seed: u64, x: i64, y: i64, salt: u64) -> f32 {
    let mut z = seed
        ^ (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ salt.wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise at cell size `cell` pixels, in [0, 1).
fn value_noise(seed: u64, x: f32, y: f32, cell: f32, salt: u64) -> f32 {
    let (gx, gy) = (x / cell, y / cell);
    let (ix, iy) = (gx.floor(), gy.floor());
    let (fx, fy) = (gx - ix, gy - iy);
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let (ix, iy) = (ix as i64, iy as i64);
    let c = |dx: i64, dy: i64| hash01(seed, ix + dx, iy + dy, salt);
    let top = c(0, 0) + (c(1, 0) - c(0, 0)) * sx;
    let bottom = c(0, 1) + (c(1, 1) - c(0, 1)) * sx;
    top + (bottom - top) * sy
}

/// The background's colour at pixel (x, y); `scale` = image side / 32 keeps the textures'
/// feature sizes proportional to the image.
fn background_rgb(name: &str, seed: u64, x: usize, y: usize, size: usize) -> [f32; 3] {
    let scale = size as f32 / 32.0;
    let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
    let grain = hash01(seed, x as i64, y as i64, 1) - 0.5;
    let shade = |c: [f32; 3], d: f32| [c[0] + d, c[1] + d, c[2] + d];
    match name {
        "gray" => [128.0, 128.0, 128.0],
        "beige" => [225.0, 210.0, 180.0],
        "grass" => {
            // Vertical blades: noise stretched along y, plus per-pixel grain.
            let blades = value_noise(seed, xf * 2.0, yf * 0.35, 2.0 * scale, 2) - 0.5;
            shade([70.0, 145.0, 50.0], blades * 70.0 + grain * 25.0)
        }
        "water" => {
            let wobble = 2.0 * libm::sinf(xf / scale * 0.35 + (seed % 7) as f32);
            let wave = libm::sinf((yf / scale) * 0.9 + wobble);
            shade([40.0, 95.0, 175.0], wave * 25.0 + grain * 10.0)
        }
        "snow" => {
            let speck = if hash01(seed, x as i64, y as i64, 3) < 0.08 {
                -45.0
            } else {
                0.0
            };
            shade([236.0, 240.0, 246.0], speck + grain * 10.0)
        }
        "sand" => {
            let ripple = value_noise(seed, xf * 0.5, yf * 2.0, 3.0 * scale, 4) - 0.5;
            shade([218.0, 188.0, 128.0], ripple * 30.0 + grain * 30.0)
        }
        "bricks" => {
            let (bw, bh) = (10.0 * scale, 5.0 * scale);
            let row = (yf / bh).floor();
            let offset = if row as i64 % 2 == 0 { 0.0 } else { bw / 2.0 };
            let (fx, fy) = ((xf + offset) / bw, yf / bh);
            let mortar = (fx - fx.floor()) * bw < 1.0 * scale || (fy - fy.floor()) * bh < scale;
            if mortar {
                shade([200.0, 196.0, 185.0], grain * 10.0)
            } else {
                shade([165.0, 65.0, 45.0], grain * 30.0)
            }
        }
        "sky" => {
            let t = yf / size as f32;
            let blue = mix([100.0, 160.0, 235.0], [190.0, 220.0, 250.0], t);
            let cloud = value_noise(seed, xf, yf * 1.6, 6.0 * scale, 5);
            let c = ((cloud - 0.6) * 4.0).clamp(0.0, 1.0);
            mix(blue, [250.0, 250.0, 252.0], c)
        }
        other => panic!("unknown background `{other}` (the spec is validated against BACKGROUNDS)"),
    }
}

/// Noun phrase and locative phrase of a background for captions.
pub fn background_phrases(name: &str) -> (&'static str, &'static str) {
    match name {
        "gray" => ("a gray background", "on a gray background"),
        "beige" => ("a beige background", "on a beige background"),
        "grass" => ("grass", "on grass"),
        "water" => ("water", "in the water"),
        "snow" => ("snow", "in the snow"),
        "sand" => ("sand", "on sand"),
        "bricks" => ("a brick wall", "in front of bricks"),
        "sky" => ("the sky", "in the sky"),
        _ => ("a background", "on a background"),
    }
}

/// The adjective of a texture in captions (empty for plain).
pub fn texture_adjective(name: &str) -> &'static str {
    match name {
        "stripes" => "striped",
        "dots" => "dotted",
        _ => "",
    }
}

/// Fills a caption template (see `spec::PLACEHOLDERS`), collapsing the spaces an empty
/// placeholder leaves.
pub fn caption(template: &str, scene: &Scene) -> String {
    let (noun, phrase) = background_phrases(&scene.background);
    let filled = template
        .replace("{shape}", &scene.shape)
        .replace("{color}", &scene.color)
        .replace("{texture}", texture_adjective(&scene.texture))
        .replace("{background_noun}", noun)
        .replace("{background}", phrase);
    let words: Vec<&str> = filled.split_whitespace().collect();
    // "a orange" -> "an orange".
    let fixed: Vec<&str> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let next_vowel = words
                .get(i + 1)
                .and_then(|n| n.chars().next())
                .is_some_and(|c| "aeiou".contains(c));
            match *w {
                "a" if next_vowel => "an",
                "A" if next_vowel => "An",
                _ => w,
            }
        })
        .collect();
    fixed.join(" ")
}
