"""The reference VLM trainer: vision encoder -> connector -> causal LM, trained stage by
stage from a `curate plan` over WebDataset tier shards.

Read in this order:
  config.py      architecture and size presets (tiny/small from code; real ones by hub id or path)
  tokenizer.py   a word-level tokenizer for tiny configs, transformers tokenizers for real ones
  vision.py      the image encoder (timm, open_clip or transformers CLIP/SigLIP ViT; hidden state -2)
  views.py       how each arch cuts images into encoder views (AnyRes-Max: grid from curation.tokens)
  lm.py          the Qwen2-style LM (transformers) run layer by layer, with a packed-sequence mask
  connectors.py  llava, omnifusion, evlm and owl3 connectors (and the LM-side blocks of the last two)
  model.py       the VLM: encode images, place them into the sequence, run the LM, loss
  data.py        shards -> conversations -> token ids -> packed batches (webdataset streaming)
  train.py       stages, optimizer, checkpoint/resume, DDP, logs and plots
  eval.py        held-out loss per tier, answer accuracy, distractor resistance
  cli.py         `curate train` and `curate eval`
"""

ARCHS = ("llava", "omnifusion", "evlm", "owl3")
SIZES = ("tiny", "small")
