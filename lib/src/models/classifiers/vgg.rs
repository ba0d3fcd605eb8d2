//! torchvision VGG (Simonyan & Zisserman 2015), e.g. VGG-16 with or without batch norm.
//!
//! Parameter names are torchvision's `nn.Sequential` indices: `features.{i}` for the convs (and
//! batch norms), `classifier.0`, `classifier.3`, `classifier.6` for the three linears (1, 4 are
//! ReLUs, 2, 5 dropouts).

use crate::ops::{Conv2d, Conv2dConfig, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::{self, BatchNorm2d};

const BN_EPS: f64 = 1e-5;
/// `AdaptiveAvgPool2d((7, 7))` before the classifier.
const POOL: usize = 7;

/// One entry of torchvision's VGG `cfg` list: a 3×3 conv with that many output channels, or
/// `"M"`, a 2×2/2 max pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "serde_json::Value")]
pub enum VggLayer {
    Conv(usize),
    MaxPool,
}

impl TryFrom<serde_json::Value> for VggLayer {
    type Error = String;

    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        match &v {
            serde_json::Value::String(s) if s == "M" => Ok(VggLayer::MaxPool),
            serde_json::Value::Number(n) => n
                .as_u64()
                .filter(|&c| c > 0)
                .map(|c| VggLayer::Conv(c as usize))
                .ok_or_else(|| format!("vgg cfg entry {v}: expected a channel count or \"M\"")),
            _ => Err(format!(
                "vgg cfg entry {v}: expected a channel count or \"M\""
            )),
        }
    }
}

impl From<VggLayer> for serde_json::Value {
    fn from(l: VggLayer) -> Self {
        match l {
            VggLayer::Conv(c) => c.into(),
            VggLayer::MaxPool => "M".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VggConfig {
    pub cfg: Vec<VggLayer>,
    pub batch_norm: bool,
    /// Width of the two hidden linears (4096 in torchvision).
    pub hidden: usize,
    pub num_classes: usize,
}

impl VggConfig {
    /// torchvision's configuration "D".
    pub fn vgg16() -> Self {
        use VggLayer::{Conv as C, MaxPool as M};
        Self {
            cfg: vec![
                C(64),
                C(64),
                M,
                C(128),
                C(128),
                M,
                C(256),
                C(256),
                C(256),
                M,
                C(512),
                C(512),
                C(512),
                M,
                C(512),
                C(512),
                C(512),
                M,
            ],
            batch_norm: false,
            hidden: 4096,
            num_classes: 1000,
        }
    }

    pub fn vgg16_bn() -> Self {
        Self {
            batch_norm: true,
            ..Self::vgg16()
        }
    }

    /// Channels of the last conv (the conv features' width).
    pub fn out_channels(&self) -> usize {
        self.cfg
            .iter()
            .rev()
            .find_map(|l| match l {
                VggLayer::Conv(c) => Some(*c),
                VggLayer::MaxPool => None,
            })
            .unwrap_or(3)
    }
}

#[derive(Debug, Clone)]
pub struct VggOutput {
    /// `[b, num_classes]`.
    pub logits: Tensor,
    /// The `features` stack's output (after the last max pool): `[b, c, h, w]`.
    pub conv_features: Tensor,
    /// `classifier.4` output (ReLU after the second linear), the last linear's input: `[b, hidden]`.
    pub penultimate: Tensor,
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d, Option<BatchNorm2d>),
    MaxPool,
}

#[derive(Debug, Clone)]
pub struct Vgg {
    features: Vec<Layer>,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    config: VggConfig,
}

impl Vgg {
    pub fn new(vb: VarBuilder, cfg: &VggConfig) -> Result<Self> {
        let vb_features = vb.pp("features");
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        // `index` walks the Sequential indices: conv [bn] relu, or maxpool.
        let (mut index, mut c_in) = (0, 3);
        let mut features = Vec::with_capacity(cfg.cfg.len());
        for layer in &cfg.cfg {
            match *layer {
                VggLayer::MaxPool => {
                    features.push(Layer::MaxPool);
                    index += 1;
                }
                VggLayer::Conv(c_out) => {
                    let conv = crate::ops::conv2d(c_in, c_out, 3, conv_cfg, vb_features.pp(index))?;
                    let bn = if cfg.batch_norm {
                        Some(BatchNorm2d::new(vb_features.pp(index + 1), c_out, BN_EPS)?)
                    } else {
                        None
                    };
                    features.push(Layer::Conv(conv, bn));
                    index += if cfg.batch_norm { 3 } else { 2 };
                    c_in = c_out;
                }
            }
        }
        let vb_cls = vb.pp("classifier");
        let flat = cfg.out_channels() * POOL * POOL;
        Ok(Self {
            features,
            fc1: crate::ops::linear(flat, cfg.hidden, vb_cls.pp(0))?,
            fc2: crate::ops::linear(cfg.hidden, cfg.hidden, vb_cls.pp(3))?,
            fc3: crate::ops::linear(cfg.hidden, cfg.num_classes, vb_cls.pp(6))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VggConfig {
        &self.config
    }

    /// `x`: normalized images `[b, 3, h, w]`.
    pub fn forward_all(&self, x: &Tensor) -> Result<VggOutput> {
        let mut x = x.clone();
        for layer in &self.features {
            x = match layer {
                Layer::Conv(conv, bn) => {
                    let y = conv.forward(&x)?;
                    ops::relu(&match bn {
                        Some(bn) => bn.forward(&y)?,
                        None => y,
                    })?
                }
                Layer::MaxPool => ops::max_pool2d(&x, 2, 2, 0)?,
            };
        }
        let conv_features = x;
        let pooled = ops::adaptive_avg_pool2d(&conv_features, (POOL, POOL))?.flatten_from(1)?;
        // Dropouts are identities at inference.
        let hidden = ops::relu(&self.fc1.forward(&pooled)?)?;
        let penultimate = ops::relu(&self.fc2.forward(&hidden)?)?;
        let logits = self.fc3.forward(&penultimate)?;
        Ok(VggOutput {
            logits,
            conv_features,
            penultimate,
        })
    }
}

impl Module for Vgg {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(x)?.logits)
    }
}
