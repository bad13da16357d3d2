"""Names of model parts a recipe chooses among, kept free of torch so that reading a recipe stays fast:
the recipe schema (fgvc/config.py) offers them and the builders (fgvc/models/attention/patch.py) build them."""

# timm.layers.get_attn's same-shape attention modules; `timm_NAME` forces timm's block where fgvc has its own
TIMM_ATTENTION = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord", "scoord",
                  "ela", "strip", "sk", "splat", "nl", "bat")
