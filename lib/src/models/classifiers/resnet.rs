//! torchvision ResNet (He et al. 2016): ResNet-18/34 with `BasicBlock`, ResNet-50/101 with
//! `Bottleneck` (the v1.5 variant torchvision ships: the stride sits on the 3×3 conv).
//!
//! Parameter names are torchvision's (`conv1`, `bn1`, `layer{1..4}.{i}.conv1/bn1/...`,
//! `downsample.0/.1`, `fc`), so a torchvision state dict loads as is. Inference only: batch norm
//! uses its running statistics, folded into a per-channel affine.
//!
//! Two config fields beyond torchvision's arguments serve small images (the ShapesWorld
//! classifier): [`Stem::Small`] (a 3×3/1 stem conv, no max pool) and per-stage `strides`.

use crate::ops::{Conv2d, Conv2dConfig, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::{self, BatchNorm2d};

/// PyTorch's `BatchNorm2d` default.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3×3 convs; output width = stage width (expansion 1).
    Basic,
    /// 1×1 → 3×3 → 1×1 convs; output width = 4 × stage width (expansion 4).
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The constructor arguments torchvision hard-codes, made explicit so that tiny configurations
/// can be built (the parity cases' `config.json` has exactly these fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage, e.g. `[3, 4, 6, 3]` for ResNet-50.
    pub layers: [usize; 4],
    /// Stage widths (`planes`), `[64, 128, 256, 512]` in torchvision.
    pub widths: [usize; 4],
    /// Output channels of the 7×7 stem conv (torchvision's `inplanes = 64`).
    pub stem_width: usize,
    pub num_classes: usize,
    /// The stem (not a torchvision argument; absent from a `config.json` means torchvision's).
    #[serde(default)]
    pub stem: Stem,
    /// Stride of each stage's first block (torchvision: `[1, 2, 2, 2]`).
    #[serde(default = "default_strides")]
    pub strides: [usize; 4],
}

/// The ResNet stem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// torchvision's: a 7×7 conv with stride 2, then a 3×3/2 max pool (¼ of the resolution).
    #[default]
    Imagenet,
    /// For small images (the CIFAR ResNets' stem): a 3×3 conv with stride 1 and no pool, so a
    /// 32×32 image keeps its resolution into `layer1`.
    Small,
}

fn default_strides() -> [usize; 4] {
    [1, 2, 2, 2]
}

impl ResNetConfig {
    fn standard(block: BlockKind, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers,
            widths: [64, 128, 256, 512],
            stem_width: 64,
            num_classes: 1000,
            stem: Stem::Imagenet,
            strides: default_strides(),
        }
    }

    pub fn resnet18() -> Self {
        Self::standard(BlockKind::Basic, [2, 2, 2, 2])
    }

    pub fn resnet34() -> Self {
        Self::standard(BlockKind::Basic, [3, 4, 6, 3])
    }

    pub fn resnet50() -> Self {
        Self::standard(BlockKind::Bottleneck, [3, 4, 6, 3])
    }

    pub fn resnet101() -> Self {
        Self::standard(BlockKind::Bottleneck, [3, 4, 23, 3])
    }

    /// Channels of the pooled penultimate features (`fc`'s input).
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.block.expansion()
    }
}

/// Everything one forward pass exposes.
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    /// `[b, num_classes]`.
    pub logits: Tensor,
    /// Globally average-pooled `layer4` output, `fc`'s input: `[b, feature_dim]`.
    pub features: Tensor,
    /// Each stage's output feature map, `layer1` .. `layer4`: `[b, c_i, h_i, w_i]`.
    pub stages: [Tensor; 4],
}

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize, stride: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding: kernel / 2,
        ..Default::default()
    };
    crate::ops::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)
}

/// `downsample.0` (1×1 conv, strided) and `downsample.1` (batch norm) on the shortcut.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("0"), c_in, c_out, 1, stride)?,
            bn: BatchNorm2d::new(vb.pp("1"), c_out, BN_EPS)?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?)
    }
}

/// One residual block of either kind: a chain of (conv, bn) pairs with ReLU between them, added
/// to the (possibly downsampled) input, then a final ReLU.
#[derive(Debug, Clone)]
struct Block {
    /// `conv1/bn1`, `conv2/bn2` and, for a bottleneck, `conv3/bn3`.
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        vb: VarBuilder,
        kind: BlockKind,
        c_in: usize,
        width: usize,
        stride: usize,
    ) -> Result<Self> {
        let c_out = width * kind.expansion();
        // (in, out, kernel, stride) of each conv.
        let shapes = match kind {
            BlockKind::Basic => vec![(c_in, width, 3, stride), (width, width, 3, 1)],
            BlockKind::Bottleneck => vec![
                (c_in, width, 1, 1),
                (width, width, 3, stride),
                (width, c_out, 1, 1),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                let n = i + 1;
                Ok((
                    conv(vb.pp(format!("conv{n}")), ci, co, k, s)?,
                    BatchNorm2d::new(vb.pp(format!("bn{n}")), co, BN_EPS)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || c_in != c_out {
            Some(Downsample::new(vb.pp("downsample"), c_in, c_out, stride)?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = bn.forward(&conv.forward(&y)?)?;
            if i != last {
                y = crate::ops::relu(&y)?;
            }
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        crate::ops::relu(&(y + shortcut)?)
    }
}

#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: [Vec<Block>; 4],
    fc: Linear,
    config: ResNetConfig,
}

impl ResNet {
    pub fn new(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        let (kernel, stride) = if cfg.stem == Stem::Small {
            (3, 1)
        } else {
            (7, 2)
        };
        let stem = Conv2dConfig {
            stride,
            padding: kernel / 2,
            ..Default::default()
        };
        let conv1 = crate::ops::conv2d_no_bias(3, cfg.stem_width, kernel, stem, vb.pp("conv1"))?;
        let bn1 = BatchNorm2d::new(vb.pp("bn1"), cfg.stem_width, BN_EPS)?;
        let mut c_in = cfg.stem_width;
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (s, stage) in stages.iter_mut().enumerate() {
            let vb_stage = vb.pp(format!("layer{}", s + 1));
            for i in 0..cfg.layers[s] {
                // Only the first block of a stage is strided (torchvision: stages 2-4 halve).
                let stride = if i == 0 { cfg.strides[s] } else { 1 };
                if stride == 0 {
                    candle_core::bail!("ResNet config: strides[{s}] is 0")
                }
                stage.push(Block::new(
                    vb_stage.pp(i),
                    cfg.block,
                    c_in,
                    cfg.widths[s],
                    stride,
                )?);
                c_in = cfg.widths[s] * cfg.block.expansion();
            }
        }
        let fc = crate::ops::linear(cfg.feature_dim(), cfg.num_classes, vb.pp("fc"))?;
        Ok(Self {
            conv1,
            bn1,
            stages,
            fc,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// The final linear layer (`fc`): weight `[num_classes, feature_dim]`.
    pub fn fc(&self) -> &Linear {
        &self.fc
    }

    /// `x`: normalized images `[b, 3, h, w]`.
    pub fn forward_all(&self, x: &Tensor) -> Result<ResNetOutput> {
        let x = crate::ops::relu(&self.bn1.forward(&self.conv1.forward(x)?)?)?;
        // A 3×3/2 pool with padding: kernel != stride, so candle's own max_pool2d would cut the
        // gradient; ops::max_pool2d's backward is exact.
        let mut x = if self.config.stem == Stem::Small {
            x
        } else {
            ops::max_pool2d(&x, 3, 2, 1)?
        };
        let mut stages = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            stages.push(x.clone());
        }
        // AdaptiveAvgPool2d((1, 1)) + flatten is the spatial mean.
        let features = x.mean((2, 3))?;
        let logits = self.fc.forward(&features)?;
        let stages: [Tensor; 4] = stages.try_into().expect("four stages");
        Ok(ResNetOutput {
            logits,
            features,
            stages,
        })
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(x)?.logits)
    }
}
