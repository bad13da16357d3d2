import torch
from fgvc.config import load_recipe
from fgvc.models.build import build_model
from fgvc.analysis.cost import count_flops
cfg = load_recipe(["recipe=cub_dcn"])
cfg.model.pretrained = False
with torch.device("meta"):
    dcn = build_model(cfg.model, 200, 448).eval()
    cfg.model.dcn.whole_image = True
    whole = build_model(cfg.model, 200, 448).eval()
    x = torch.empty(1, 3, 448, 448)
    fw = count_flops(whole, x)
    print("whole", fw / 1e9)
    for k in (0, 1, 2, 4, 8):
        f = count_flops(lambda t: dcn(t, top_k=k), x)
        print(k, round(f / 1e9, 3), round(f / fw, 3))
