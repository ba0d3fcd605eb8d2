//! CLIP's byte-level BPE tokenizer: prompt text -> the 77 token ids the CLIP text encoder reads.
//!
//! Built on the `tokenizers` crate with the same pipeline as transformers' `CLIPTokenizer`:
//! NFC + whitespace collapse + lower case; CLIP's regex split, then byte-level characters (no
//! prefix space); BPE whose word-final pieces end in `</w>`. The ids match transformers exactly
//! (`tests/tokenizer.rs` checks ~40 sentences against `tests/fixtures/clip_tokenizer_ids.json`).
//!
//! Sources of a tokenizer:
//! - [`ClipTokenizer::embedded`]: OpenAI's vocabulary (`lib/assets/bpe_simple_vocab_16e6.txt.gz`,
//!   compiled in), the tokenizer of SD 1.x (`openai/clip-vit-large-patch14`): pad = `<|endoftext|>`.
//! - [`ClipTokenizer::from_pretrained_dir`]: a Hub `tokenizer/` folder (`tokenizer.json`, or
//!   `vocab.json` + `merges.txt`), with bos/eos/pad taken from its `special_tokens_map.json` or
//!   `tokenizer_config.json` (SD 2.x pads with `!`, id 0).
//! - [`ClipTokenizer::from_file`]: one `tokenizer.json`.
//!
//! Text longer than the context is truncated as transformers does with `truncation=True`: the
//! first `max_len - 2` text tokens are kept between the start and end tokens.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, Model, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// CLIP's context length: every prompt becomes this many ids.
pub const CONTEXT_LENGTH: usize = 77;
/// Start-of-text token (id 49406 in CLIP's vocabulary).
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// End-of-text token (id 49407), also SD 1.x's padding token.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Suffix that marks the last piece of a word in CLIP's vocabulary (`dog</w>`).
pub const END_OF_WORD: &str = "</w>";
/// Where the soft prompt goes in a template: `"A texture of {}"`.
pub const PLACEHOLDER: &str = "{}";

/// OpenAI's BPE merges (`bpe_simple_vocab_16e6.txt.gz`, MIT, from github.com/openai/CLIP).
const EMBEDDED_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 49152 - 256 - 2 merges of the file (after its `#version` line).
const CLIP_MERGES: usize = 49152 - 256 - 2;
/// CLIP's pre-tokenizer regex (transformers' `CLIPTokenizer`; OpenAI's with the special tokens).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Everything that can go wrong; file errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokenizer file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "no tokenizer in {dir}: expected tokenizer.json, or vocab.json and merges.txt \
         (a Hugging Face `tokenizer/` folder)"
    )]
    NotATokenizerDir { dir: PathBuf },
    #[error("special token {token:?} ({role}) is not in the vocabulary of {origin}")]
    MissingSpecialToken {
        token: String,
        role: &'static str,
        origin: String,
    },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error(
        "max_len {max_len} leaves no room for text: it must be at least 2 (start and end tokens)"
    )]
    MaxLenTooSmall { max_len: usize },
    #[error(
        "template {template:?} must contain the placeholder \"{{}}\" exactly once (found {found})"
    )]
    Placeholder { template: String, found: usize },
    #[error(
        "template {template:?} with {slots} soft-prompt slots needs {needed} tokens, more than \
         max_len {max_len}; the slots are never truncated"
    )]
    TemplateTooLong {
        template: String,
        slots: usize,
        needed: usize,
        max_len: usize,
    },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A template encoded around the soft-prompt slots (see [`ClipTokenizer::encode_template`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateIds {
    /// `max_len` ids: bos, text before `{}`, the slots (filled with the pad id), text after, eos,
    /// padding.
    pub ids: Vec<u32>,
    /// Positions of the slots in `ids`, whose embeddings the soft prompt replaces.
    pub slots: Range<usize>,
}

/// CLIP's tokenizer: text -> ids with start/end tokens, padded to [`CONTEXT_LENGTH`].
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    /// The 256 byte-level characters back to their bytes (for decoding).
    char_to_byte: HashMap<char, u8>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// Special tokens as written in a `special_tokens_map.json` / `tokenizer_config.json`.
#[derive(Debug, Default, Clone)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
}

impl ClipTokenizer {
    /// OpenAI CLIP's tokenizer from the vocabulary compiled into the library (SD 1.x's; pads
    /// with `<|endoftext|>`).
    pub fn embedded() -> Result<Self> {
        Self::from_bpe_merges_gz_bytes(EMBEDDED_BPE_GZ, "the embedded bpe_simple_vocab_16e6.txt.gz")
    }

    /// CLIP's tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (as shipped in the `clip`
    /// and `open_clip_torch` packages), built as OpenAI CLIP and open_clip build it.
    pub fn from_bpe_merges_gz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| io(path, source))?;
        Self::from_bpe_merges_gz_bytes(&bytes, &path.display().to_string())
    }

    /// [`Self::from_bpe_merges_gz`] from the file's bytes; `origin` names them in errors.
    ///
    /// Vocabulary: the 256 byte-level characters, the same with `</w>`, the first
    /// 49152 - 256 - 2 merges joined, `<|startoftext|>`, `<|endoftext|>` (49408 tokens).
    pub fn from_bpe_merges_gz_bytes(gz: &[u8], origin: &str) -> Result<Self> {
        let invalid = |message: String| TokenizerError::Invalid {
            path: PathBuf::from(origin),
            message,
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| invalid(format!("not a gzip-compressed UTF-8 merges file ({e})")))?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < CLIP_MERGES + 1 {
            return Err(invalid(format!(
                "{} lines, CLIP needs a header line and {CLIP_MERGES} merges",
                lines.len()
            )));
        }
        let mut merges = Merges::with_capacity(CLIP_MERGES);
        for (i, line) in lines[1..=CLIP_MERGES].iter().enumerate() {
            merges.push(parse_merge(line).ok_or_else(|| {
                invalid(format!(
                    "line {}: expected two symbols, got {line:?}",
                    i + 2
                ))
            })?);
        }
        let chars = byte_chars();
        let mut tokens: Vec<String> = chars.iter().map(|(_, c)| c.to_string()).collect();
        tokens.extend(chars.iter().map(|(_, c)| format!("{c}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS_TOKEN.to_string());
        tokens.push(EOS_TOKEN.to_string());
        let vocab: Vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::from_vocab_and_merges(vocab, merges, &SpecialTokens::default(), origin)
    }

    /// A Hugging Face `tokenizer.json`; bos/eos are `<|startoftext|>`/`<|endoftext|>`, pad is the
    /// file's padding token if it sets one, else `<|endoftext|>`. Use
    /// [`Self::from_pretrained_dir`] to honor a folder's `special_tokens_map.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_tokenizer_json(path.as_ref(), &SpecialTokens::default())
    }

    /// A Hub `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`
    /// (with CLIP's normalizer and pre-tokenizer). Special tokens come from
    /// `special_tokens_map.json`, else `tokenizer_config.json`, else CLIP's defaults (pad =
    /// `<|endoftext|>`).
    pub fn from_pretrained_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            ));
        }
        let specials = read_special_tokens(dir)?;
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json, &specials);
        }
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab_path.is_file() || !merges_path.is_file() {
            return Err(TokenizerError::NotATokenizerDir {
                dir: dir.to_path_buf(),
            });
        }
        let vocab = read_vocab_json(&vocab_path)?;
        let merges = read_merges_txt(&merges_path)?;
        Self::from_vocab_and_merges(vocab, merges, &specials, &dir.display().to_string())
    }

    fn from_tokenizer_json(path: &Path, specials: &SpecialTokens) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| io(path, source))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let file_pad = inner.get_padding().map(|p| p.pad_token.clone());
        let specials = SpecialTokens {
            pad: specials.pad.clone().or(file_pad),
            ..specials.clone()
        };
        Self::with_specials(inner, &specials, &path.display().to_string())
    }

    /// CLIP's pipeline around a BPE vocabulary (transformers' `CLIPTokenizer.__init__`).
    fn from_vocab_and_merges(
        vocab: Vocab,
        merges: Merges,
        specials: &SpecialTokens,
        origin: &str,
    ) -> Result<Self> {
        let invalid = |message: String| TokenizerError::Invalid {
            path: PathBuf::from(origin),
            message,
        };
        let bos = specials.bos.clone().unwrap_or_else(|| BOS_TOKEN.into());
        let eos = specials.eos.clone().unwrap_or_else(|| EOS_TOKEN.into());
        let id_of = |token: &str, role| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    token: token.to_string(),
                    role,
                    origin: origin.to_string(),
                })
        };
        let (bos_id, eos_id) = (id_of(&bos, "bos")?, id_of(&eos, "eos")?);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.into())
            .unk_token(EOS_TOKEN.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| invalid(format!("bad BPE vocabulary/merges: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| invalid(e.to_string()))?;
        inner
            .with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
                vec![NFC.into(), whitespace.into(), Lowercase.into()],
            ))))
            .map_err(|e| invalid(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| invalid(e.to_string()))?;
        // transformers: ByteLevel(add_prefix_space=False) with its default use_regex=True (a
        // no-op after CLIP's split) and trim_offsets=True.
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
            PreTokenizerSequence::new(vec![split.into(), byte_level.into()]),
        )));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
        inner.with_post_processor(Some(PostProcessorWrapper::Roberta(
            RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        )));
        inner
            .add_special_tokens([AddedToken::from(bos, true), AddedToken::from(eos, true)])
            .map_err(|e| invalid(e.to_string()))?;
        Self::with_specials(inner, specials, origin)
    }

    fn with_specials(inner: Tokenizer, specials: &SpecialTokens, origin: &str) -> Result<Self> {
        let id_of = |token: Option<&String>, default: &str, role| {
            let token = token.map(String::as_str).unwrap_or(default);
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    token: token.to_string(),
                    role,
                    origin: origin.to_string(),
                })
        };
        let bos_id = id_of(specials.bos.as_ref(), BOS_TOKEN, "bos")?;
        let eos_id = id_of(specials.eos.as_ref(), EOS_TOKEN, "eos")?;
        let default_pad = specials.eos.clone().unwrap_or_else(|| EOS_TOKEN.into());
        let pad_id = id_of(specials.pad.as_ref(), &default_pad, "pad")?;
        let char_to_byte = byte_chars().into_iter().map(|(b, c)| (c, b)).collect();
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            char_to_byte,
        })
    }

    /// Ids of `text` between the start and end tokens, without truncation or padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(self.bos_id);
        ids.extend(self.encode_text(text)?);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Exactly `max_len` ids (CLIP: [`CONTEXT_LENGTH`]): start, text, end, then the pad id. Text
    /// that does not fit is truncated like transformers' `truncation=True`: the first
    /// `max_len - 2` text tokens are kept and the end token stays last.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(TokenizerError::MaxLenTooSmall { max_len });
        }
        let text_ids = self.encode_text(text)?;
        let keep = text_ids.len().min(max_len - 2);
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&text_ids[..keep]);
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(ids)
    }

    /// Encodes a DiffExplainer template such as `"A texture of {}"` with `slots` soft-prompt
    /// positions where `{}` stands, padded to `max_len`. The text on each side of `{}` is
    /// tokenized on its own (CLIP splits words at spaces and punctuation, so `"of {}"` tokenizes
    /// `"of"` as it would anyway). Errors if `{}` is missing or repeated, or if the result does
    /// not fit in `max_len` (the slots are never truncated).
    pub fn encode_template(
        &self,
        template: &str,
        slots: usize,
        max_len: usize,
    ) -> Result<TemplateIds> {
        let found = template.matches(PLACEHOLDER).count();
        let (before, after) = match template.split_once(PLACEHOLDER) {
            Some(parts) if found == 1 => parts,
            _ => {
                return Err(TokenizerError::Placeholder {
                    template: template.to_string(),
                    found,
                })
            }
        };
        let (before, after) = (self.encode_text(before)?, self.encode_text(after)?);
        let needed = before.len() + slots + after.len() + 2;
        if needed > max_len {
            return Err(TokenizerError::TemplateTooLong {
                template: template.to_string(),
                slots,
                needed,
                max_len,
            });
        }
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&before);
        let start = ids.len();
        ids.resize(start + slots, self.pad_id);
        ids.extend_from_slice(&after);
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(TemplateIds {
            ids,
            slots: start..start + slots,
        })
    }

    /// Text ids without start/end tokens (special tokens written in the text are recognized).
    fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_string(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Start-of-text id (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// End-of-text id (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id: 49407 (`<|endoftext|>`) for SD 1.x, 0 (`!`) for SD 2.x's tokenizer.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of tokens, special ones included (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a vocabulary entry as written there (`"dog</w>"`, `"<|endoftext|>"`), if any.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry as stored (`"dog</w>"`, `"Ġ"`-style byte characters), if any.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether the token ends a word (`"dog</w>"`: yes; `"hen"` of `"hen-of"`: no).
    pub fn is_word_end(&self, id: u32) -> bool {
        self.token(id).is_some_and(|t| t.ends_with(END_OF_WORD))
    }

    /// A token as readable text: `"dog</w>"` -> `"dog"`, byte characters back to UTF-8 (a piece of
    /// a multi-byte character shows as U+FFFD), special tokens as written. `None` if out of range.
    pub fn decode_token(&self, id: u32) -> Option<String> {
        let token = self.token(id)?;
        if self.is_special(id) {
            return Some(token);
        }
        let piece = token.strip_suffix(END_OF_WORD).unwrap_or(&token);
        Some(self.bytes_to_text(piece))
    }

    /// Ids back to text as transformers' `decode(ids, skip_special_tokens=True)`: special tokens
    /// dropped, `</w>` becomes a space, surrounding spaces trimmed.
    pub fn decode(&self, ids: &[u32]) -> String {
        let joined: String = ids
            .iter()
            .filter(|&&id| !self.is_special(id))
            .filter_map(|&id| self.token(id))
            .collect();
        self.bytes_to_text(&joined)
            .replace(END_OF_WORD, " ")
            .trim()
            .to_string()
    }

    /// Whether `id` is a special token (start, end, or any added special token).
    pub fn is_special(&self, id: u32) -> bool {
        id == self.bos_id
            || id == self.eos_id
            || self
                .inner
                .get_added_vocabulary()
                .simple_id_to_token(id)
                .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The underlying `tokenizers::Tokenizer` (its post-processor adds start/end tokens).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Writes `tokenizer.json`, `vocab.json`, `merges.txt` and `special_tokens_map.json` into `dir`
    /// (created if needed): a folder [`Self::from_pretrained_dir`] and transformers'
    /// `CLIPTokenizer.from_pretrained` read back with the same ids and pad token.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        let json = dir.join("tokenizer.json");
        self.inner
            .save(&json, false)
            .map_err(|e| io(&json, std::io::Error::other(e.to_string())))?;
        self.inner
            .get_model()
            .save(dir, None)
            .map_err(|e| io(dir, std::io::Error::other(e.to_string())))?;
        let name = |id: u32| self.token(id).unwrap_or_default();
        let specials = serde_json::json!({
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "pad_token": name(self.pad_id),
            "unk_token": name(self.eos_id),
        });
        let map = dir.join("special_tokens_map.json");
        std::fs::write(&map, format!("{specials:#}\n")).map_err(|source| io(&map, source))?;
        Ok(())
    }

    /// Byte-level characters -> UTF-8 text (lossy); other characters pass through.
    fn bytes_to_text(&self, s: &str) -> String {
        let mut bytes = Vec::with_capacity(s.len());
        for c in s.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// OpenAI CLIP's `bytes_to_unicode`: (byte, the printable character standing for it), in that
/// function's order, which is the order of the vocabulary's first 256 tokens: the printable
/// Latin-1 bytes (standing for themselves) first, then the others, mapped to U+0100, U+0101, ...
fn byte_chars() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let mut pairs: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    pairs.extend(
        others
            .zip(256u32..)
            .map(|(b, c)| (b, char::from_u32(c).unwrap())),
    );
    pairs
}

fn parse_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

fn io(path: &Path, source: std::io::Error) -> TokenizerError {
    TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_vocab_json(path: &Path) -> Result<Vocab> {
    let text = std::fs::read_to_string(path).map_err(|source| io(path, source))?;
    let map: HashMap<String, u32> =
        serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!("expected a JSON object of token -> id ({e})"),
        })?;
    Ok(map.into_iter().collect())
}

/// `merges.txt`: an optional `#version` line, then one `a b` pair a line.
fn read_merges_txt(path: &Path) -> Result<Merges> {
    let text = std::fs::read_to_string(path).map_err(|source| io(path, source))?;
    let mut merges = Merges::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        merges.push(parse_merge(line).ok_or_else(|| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!("line {}: expected two symbols, got {line:?}", i + 1),
        })?);
    }
    Ok(merges)
}

/// bos/eos/pad from `special_tokens_map.json`, else `tokenizer_config.json`, where each is a
/// string or `{"content": ...}`.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| io(&path, source))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let get = |key: &str| match json.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        };
        return Ok(SpecialTokens {
            bos: get("bos_token"),
            eos: get("eos_token"),
            pad: get("pad_token"),
        });
    }
    Ok(SpecialTokens::default())
}
