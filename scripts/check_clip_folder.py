"""Loads a `world train-clip` folder (OUT/diffusion) with transformers and reports what it finds.

    /work/pyref/bin/python scripts/check_clip_folder.py OUT/diffusion

Checks that transformers' CLIPTokenizer, CLIPTextModel, CLIPTextModelWithProjection and
CLIPVisionModelWithProjection load the folders with no missing or unexpected weights (except
`text_projection.weight`, which a bare CLIPTextModel does not use), that the tokenizer pads to the
text encoder's context, and prints the text embeddings' cosine similarities of a few captions.
"""
import sys

import torch
from transformers import (CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, CLIPVisionModelWithProjection)

d = sys.argv[1]
tok = CLIPTokenizer.from_pretrained(f"{d}/tokenizer")
text, info = CLIPTextModelWithProjection.from_pretrained(f"{d}/text_encoder", output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
bare, info_bare = CLIPTextModel.from_pretrained(f"{d}/text_encoder", output_loading_info=True)
assert not info_bare["missing_keys"], info_bare
vision, vinfo = CLIPVisionModelWithProjection.from_pretrained(f"{d}/image_encoder", output_loading_info=True)
assert not vinfo["missing_keys"] and not vinfo["unexpected_keys"], vinfo
proc = CLIPImageProcessor.from_pretrained(f"{d}/feature_extractor")
L = text.config.max_position_embeddings
assert tok.model_max_length == L, (tok.model_max_length, L)
captions = ["a circle", "a red circle on grass", "a blue square in the snow", "a star", "snow"]
batch = tok(captions, padding="max_length", max_length=L, return_tensors="pt")
with torch.no_grad():
    e = text(**batch).text_embeds.float()
    h = bare(**batch).last_hidden_state
    x = torch.rand(2, 3, vision.config.image_size, vision.config.image_size)
    i = vision(pixel_values=x).image_embeds
e = e / e.norm(dim=-1, keepdim=True)
print("tokenizer vocab", len(tok), "context", L, "ids of", repr(captions[1]), batch.input_ids[1][:12].tolist())
print("last_hidden_state", tuple(h.shape), "image_embeds", tuple(i.shape))
print("unused by CLIPTextModel:", info_bare["unexpected_keys"])
print("cosines:")
for a in range(len(captions)):
    print(f"  {captions[a]:<28}", " ".join(f"{v:+.2f}" for v in (e[a] @ e.T).tolist()))
print("ok: transformers loads every folder")
