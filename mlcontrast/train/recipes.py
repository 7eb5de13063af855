"""Training recipes (``--recipe``): named sets of option values, each overridable by its own flag.

- ``digits`` (the default): the parser's defaults, sized for the embedded digits dataset on a CPU
  (AdamW + OneCycle, 15 epochs, batch 64, a small random-init backbone trained whole, hidden sizes 128/64).
- ``paper``: the settings of the released training scripts, per method and dataset, so that a user with
  the data, the ImageNet weights (``--weights``) and the GPUs can reproduce a published run. Every value
  below cites where it comes from:

  - S = ``yu-gi-oh-leilei/SADCL`` at ba9a7ec (``scripts/sadcl/coco.sh``, stage 2; the run's
    ``checkpoint/SADCL/ResNet_448_MSCOCO14/config.json``; ``code/lib_sadcl/...``);
  - H = ``HCPLab-SYSU/HCP-MLR-PL`` at d9fd300 (``scripts/HST.sh``, ``HST.py``, ``model/...``, ``utils/...``);
  - TRM-ML released no code: its values are guesses (marked so), mostly from the same author's DualCoOp
    reproduction, D = ``yu-gi-oh-leilei/DualCoop`` at 018e7c5 (``config/dualcoop/{coco2014,voc2007}_SGD.yaml``,
    ``code/lib_dualcoop_newoptim/...``; research/seeds_methods.md §4.2).

  Only COCO has a released script for SADCL and HST; the other datasets reuse the COCO values (marked
  "guess") except where a released file says otherwise. HST's Visual Genome is VG-200 (``--dataset vg200``);
  SADCL's is VG-500 (``--dataset vg``).

Keys are the option names of ``mlcontrast-train`` (argparse ``dest``). ``batch_size`` is per process, as
everywhere in the package: SADCL's released global batch of 64 is 32 on each of 2 GPUs.
"""

from __future__ import annotations

__all__ = ["RECIPES", "PAPER", "RELEASED_FILES", "recipe_values", "released_files"]

RECIPES = ("digits", "paper")

# ------------------------------------------------------------------------------------------------- SADCL
SADCL_COCO = {
    "optimizer": "adamw",              # S coco.sh:36 --optim AdamW; main_worker.py:104-109 (betas .9/.999)
    "lr": 5e-5,                        # S coco.sh:36 --lr 5e-5
    "weight_decay": 5e-3,              # S coco.sh:37 --weight-decay 5e-3 (single_lr: one group, main_worker.py:93)
    "scheduler": "onecycle",           # S coco.sh:44 --lr_scheduler OneCycleLR, per iteration (engine.py:162-163)
    "pct_start": 0.2,                  # S main_worker.py:168 OneCycleLR(..., pct_start=0.2)
    "epochs": 80,                      # S coco.sh:36 --epochs 80 (with early stop)
    "batch_size": 32,                  # S coco.sh:32 --batch-size 64 over 2 GPUs (get_dataset.py:21: 64 // world)
    "img_size": 448,                   # S coco.sh:37 --img_size 448
    "augment": "multiscale_crop",      # S coco.sh:38 --crop; get_dataset.py:31-36 (Cutout/RandAugment off with crop)
    "backbone": "resnet101",           # S coco.sh:32 --backbone resnet101 (torchvision ImageNet V1 weights)
    "feature_index": -1,               # S backbone.py:142 return_layers {'layer4'}
    "feature_pool": 1,                 # S: layer4's map as is (14×14 at 448 px)
    "train_layers": "layer2,layer3,layer4",  # S backbone.py:90 stem and layer1 frozen
    "bn_mode": "frozen",               # S backbone.py:137 norm_layer=FrozenBatchNorm2d
    "model_ema": 0.9998,               # S coco.sh:42 --ema-decay 0.9998, from epoch 0 (config.json ema_epoch)
    "early_stop": 8,                   # S coco.sh:41 --early-stop; main_worker.py:294 patience 8
    "early_stop_rule": "sadcl",        # S main_worker.py:292-301: raw best epoch too, and last EMA mAP < its best
    "stop_on_nan": True,               # S engine.py:100-130 (NaN training loss), main_worker.py:280-289: exit(1)
    "amp": "fp16",                     # S coco.sh:41 --amp; engine.py:16,67 GradScaler + autocast
    "accumulate": 1,                   # S: no accumulation
    "hidden_dim": 2048,                # S coco.sh:39 --hidden_dim 2048 (FFN 8192 = 4·d, as LabelDecoder)
    "proj_dim": 1024,                  # S models/sadcl.py:73 proj_head_dim = 1024
    "sscl_scope": "local",             # S main_worker.py:50 DDP; SSCL contrasts each GPU's 32 rows only
    "legacy_sadcl_mask": True,         # S loss/multisupconloss.py (audit: the released mask quirk)
    "legacy_learned_prototypes": True,  # S models/sadcl.py:104-105 prototypes an nn.Parameter, no EMA
}

SADCL_VOC = {**SADCL_COCO}             # guess: coco.sh's settings (no VOC script); S inits VOC from the COCO model
SADCL_NUSWIDE = {**SADCL_COCO}         # guess: coco.sh's settings (S models/sadcl.py:92 ships a 448-px NUS prototype)
SADCL_VG = {**SADCL_COCO, "img_size": 576}  # S models/sadcl.py:94 the VG-500 prototypes are resnet101_576; rest guess

# --------------------------------------------------------------------------------------------------- HST
HST_COCO = {
    "optimizer": "adam",               # H HST.py:87 torch.optim.Adam(weight_decay=...): coupled L2
    "lr": 1e-5,                        # H scripts/HST.sh:24 lr=1e-5
    "weight_decay": 5e-4,              # H scripts/HST.sh:26 weightDecay=5e-4
    "scheduler": "step",               # H HST.py:89 StepLR, stepped once per epoch (HST.py:112)
    "step_size": 10,                   # H scripts/HST.sh:21 stepEpoch=10
    "step_gamma": 0.1,                 # H HST.py:89 gamma=0.1
    "epochs": 20,                      # H scripts/HST.sh:19 epochs=20
    "batch_size": 32,                  # H scripts/HST.sh:23 batchSize=32 (one GPU)
    "img_size": 448,                   # H scripts/HST.sh:28 cropSize=448
    "augment": "choice_crop",          # H utils/dataloader.py:72-78 (scaleSize=512, HST.sh:29)
    "backbone": "resnet101",           # H model/HST.py:21 resnet101()
    "feature_index": -1,               # H model/backbone/resnet.py:145 layer4
    "feature_pool": 2,                 # H model/backbone/resnet.py:108,146 AvgPool2d(2) after layer4 (7×7 at 448)
    "train_layers": "layer4",          # H HST.py:83-86 only backbone.layer4 (and the heads) require grad
    "bn_mode": "train",                # H HST.py:127-129 backbone.eval(); layer4.train(): layer4's BN updates
    "model_ema": None,                 # H: none
    "early_stop": None,                # H: none (HST.py:117 keeps the best mAP)
    "amp": None,                       # H: fp32
    "accumulate": 1,                   # H: no accumulation
    "hidden_dim": 1024,                # H model/HST.py:15 imageFeatureDim=1024 (= outputDim)
    "hst_sd_dim": 512,                 # H model/HST.py:15 intermediaDim=512
    "hst_pair_dim": 1024,              # H model/HST.py:15,47 intra_fc_2 → outputDim=1024
    "hst_embed_dim": 300,              # H model/HST.py:16 wordFeatureDim=300 (GloVe file: --hst-word-vectors)
    "hst_ggnn_steps": 3,               # H model/HST.py:16 timeStep=3
    "hst_generate_label_epoch": 5,     # H scripts/HST.sh:32 generateLabelEpoch=5 (= computePrototypeEpoch, :49)
    "hst_prototypes": 10,              # H scripts/HST.sh:47 prototypeNumber=10
    "hst_theta_init": 1.0,             # H scripts/HST.sh:34,40 intraMargin = interMargin = 1.0
    "hst_theta_decay": 5e-4,           # H scripts/HST.sh:26 weightDecay (θ decays with the optimizer's L2)
    "hst_cooc_weight": 10.0,           # H scripts/HST.sh:38 intraCooccurrenceWeight=10.0
    "hst_intra_bce_weight": 0.1,       # H scripts/HST.sh:37 intraBCEWeight=0.1
    "hst_inter_bce_weight": 0.1,       # H scripts/HST.sh:43 interBCEWeight=0.1
    "hst_instance_weight": 0.05,       # H scripts/HST.sh:44 interInstanceDistanceWeight=0.05
    "hst_prototype_weight": 0.05,      # H scripts/HST.sh:45 interPrototypeDistanceWeight=0.05
    "partial_seed": 0,                 # H datasets/coco2014.py:110 np.random.seed(0) before the mask draw
    "legacy_hst_sign": True,           # H loss/HST.py (audit): the released prototype-loss sign
    "legacy_hst_neg_neg_push": True,   # H loss/HST.py (audit): negative pairs pushed apart too
    "legacy_hst_cooc_unknown_negative": True,  # H loss/HST.py (audit): unknown pairs count as negatives
}

HST_VOC = {**HST_COCO}                 # guess: HST.sh's settings (the repo has only the COCO script)
HST_VG200 = {**HST_COCO}               # guess: HST.sh's settings; VG-200: H utils/dataloader.py:55-58, config.py:25

# ------------------------------------------------------------------------------------------------ TRM-ML
TRMML_COCO = {
    # every value is a guess: TRM-ML released no code; D = the same author's DualCoOp (see the module docstring)
    "optimizer": "sgd",                # guess: D coco2014_SGD.yaml:92,95 SGD, momentum 0.9
    "lr": 2e-3,                        # guess: D coco2014_SGD.yaml:101
    "weight_decay": 5e-4,              # guess: D coco2014_SGD.yaml:97
    "scheduler": "cosine",             # guess: D coco2014_SGD.yaml:93 (D steps it per epoch, train.py:97-98)
    "warmup_epochs": 1,                # guess: D coco2014_SGD.yaml:104-105 constant warm-up, 1 epoch
    "warmup_lr": 1e-5,                 # guess: D config_opt.py:180 warmup_cos_lr (lr_scheduler.py:135-143)
    "epochs": 50,                      # guess: D coco2014_SGD.yaml:130
    "batch_size": 32,                  # guess: D coco2014_SGD.yaml:100 64 over 2 GPUs (coco.sh; get_dataset.py:17)
    "img_size": 448,                   # guess: D coco2014_SGD.yaml:21,32
    "augment": "autoaugment_crop",     # guess: D coco2014_SGD.yaml:36-38; transforms.py:220-257
    "trmml_clip_model": "RN101",       # guess: D coco2014_SGD.yaml:45
    "train_layers": "all",             # paper Fig. 2 caption: the CLIP encoders are frozen by the method itself
    "bn_mode": "train",                # (frozen CLIP stays in eval mode: trmml_encoders.py)
    "feature_pool": 1,                 # guess
    "model_ema": 0.9998,               # guess: D coco2014_SGD.yaml:131
    "model_ema_start": 0,              # guess: D coco2014_SGD.yaml:132 (voc2007_SGD.yaml:126: 2)
    "early_stop": 8,                   # guess: D coco2014_SGD.yaml:126; main_worker.py:201-206 (SADCL's rule)
    "early_stop_rule": "sadcl",        # guess: ibid.
    "stop_on_nan": True,               # guess: D main_worker.py:189-198 exit(1) on a NaN validation loss
    "amp": None,                       # guess: D coco2014_SGD.yaml:125 amp False
    "accumulate": 1,                   # guess
}

TRMML_VOC = {**TRMML_COCO, "model_ema_start": 2}  # guess: D voc2007_SGD.yaml:126 ema_epoch 2
TRMML_NUSWIDE = {**TRMML_COCO}         # guess
TRMML_VG = {**TRMML_COCO}              # guess
TRMML_VG200 = {**TRMML_COCO}           # guess (a TRM-ML summary names VG-200 among its datasets: research/trmml.md)
TRMML_CUB = {**TRMML_COCO}             # guess

#: (method, dataset) → the ``paper`` recipe's values
PAPER: dict[tuple[str, str], dict] = {
    ("sadcl", "coco2014"): SADCL_COCO, ("sadcl", "voc2007"): SADCL_VOC, ("sadcl", "nuswide"): SADCL_NUSWIDE,
    ("sadcl", "vg"): SADCL_VG,
    ("hst", "coco2014"): HST_COCO, ("hst", "voc2007"): HST_VOC, ("hst", "vg200"): HST_VG200,
    ("trmml", "coco2014"): TRMML_COCO, ("trmml", "voc2007"): TRMML_VOC, ("trmml", "nuswide"): TRMML_NUSWIDE,
    ("trmml", "vg"): TRMML_VG, ("trmml", "vg200"): TRMML_VG200, ("trmml", "cub"): TRMML_CUB,
}

#: (method, dataset) without a table, whose release uses another dataset name here
_NEARBY = {("hst", "vg"): "HST's release trains on VG-200 (HCP-MLR-PL utils/dataloader.py:55-58): use --dataset vg200"}


# ----------------------------------------------------------------------------------- files the releases load
# The recipe cannot know where a user keeps them: each entry is an option (left null) and where the release
# gets the file. ``--print-config`` shows them under ``released_files``; README "Reproducing a published result".
_S, _H = "yu-gi-oh-leilei/SADCL@ba9a7ec", "HCPLab-SYSU/HCP-MLR-PL@d9fd300"
_S_PROTO = ("float32 [{c}, 2048] .npy shipped in " + _S + ": data/prototype/vis_prototype_embed_file_select_"
            "resnet101_{px}_{name}_085.npy (code/lib_sadcl/models/sadcl.py:88-111: the prototypes and every "
            "memory-bank slot)")
_S_INIT = ("the stage-1 Query2Label checkpoint, not shipped: " + _S + " scripts/sadcl/coco.sh step 1 trains it, "
           "step 2 passes its model_best.pth.tar as --resume (code/lib_sadcl/utils/util.py:85-132 copies the "
           "matching keys{voc})")
_S_VOC = "; a COCO model's class rows through the VOC ← COCO map"
_H_WORDS = ("GloVe class vectors, float [{c}, 300] .npy: {path} from the data.zip linked in " + _H + " README.md:23 "
            "(utils/dataloader.py:34-44; frozen at model/HST.py:108-109)")
_WEIGHTS = "ImageNet ResNet-101 weights as a local file ({where})"

RELEASED_FILES: dict[tuple[str, str], dict[str, str]] = {
    **{("sadcl", ds): {
        "weights": _WEIGHTS.format(where=_S + " code/lib_sadcl/models/backbone.py:116-137: torchvision "
                                         "IMAGENET1K_V1, what stage 1 starts from; not needed with --sadcl-init, "
                                         "whose checkpoint holds the backbone"),
        "sadcl_init": _S_INIT.format(voc=_S_VOC if ds == "voc2007" else ""),
        "sadcl_prototypes": _S_PROTO.format(c=c, px=px, name=name),
    } for ds, c, px, name in (("coco2014", 80, 448, "coco"), ("voc2007", 20, 448, "voc"),
                              ("nuswide", 81, 448, "nuswide"), ("vg", 500, 576, "vg500"))},
    **{("hst", ds): {
        "weights": _WEIGHTS.format(where=_H + " utils/checkpoint.py:8-25: resnet101.pth, fc.* skipped"),
        "hst_class_embeddings": _H_WORDS.format(c=c, path=path),
    } for ds, c, path in (("coco2014", 80, "data/coco/vectors.npy"),
                          ("voc2007", 20, "data/voc_devkit/VOC2007/voc07_vector.npy"),
                          ("vg200", 200, "data/vg/vg_200_vector.npy"))},
    **{("trmml", ds): {
        "trmml_clip_checkpoint": "CLIP RN101 weights as a local open_clip file (guess: the author's DualCoOp "
                                 "config; TRM-ML released no code)",
    } for ds in ("coco2014", "voc2007", "nuswide", "vg", "vg200", "cub")},
}


def released_files(recipe: str, method: str, dataset: str) -> dict[str, str]:
    """The files ``recipe`` expects for ``method`` on ``dataset``: option name → where the release gets the
    file (empty for ``digits`` and where no release loads one)."""
    return dict(RELEASED_FILES.get((method, dataset), {})) if recipe == "paper" else {}


def recipe_values(recipe: str, method: str, dataset: str) -> dict:
    """The option values that ``recipe`` sets for ``method`` on ``dataset`` (``digits``: none, the parser's
    defaults are that recipe). Raises ``ValueError`` where the paper recipe has no table."""
    if recipe == "digits":
        return {}
    if recipe != "paper":
        raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    if (method, dataset) in _NEARBY:
        raise ValueError(f"--recipe paper has no settings for --method {method} --dataset {dataset}: "
                         f"{_NEARBY[(method, dataset)]}")
    if (method, dataset) not in PAPER:
        have = sorted(f"{m}/{d}" for m, d in PAPER)
        raise ValueError(f"--recipe paper has no settings for --method {method} --dataset {dataset} (released "
                         f"scripts exist for: {', '.join(have)}); use --recipe digits and set the options")
    return dict(PAPER[(method, dataset)])
