"""Issue check: jaxexit-calibrate (entropy, consistency, eps 0.02, delta 0.1) on 100 random halves of the
committed SST-2 3-epoch, MRPC joint and CIFAR-10 logits; violations and mean saving on the other half.
Run: python bench/certified_halves.py > results/certified_halves.txt"""
import io, contextlib, json, numpy as np, tempfile, os
from jaxexit.cli import calibrate
from jaxexit.exits import policies, offline, risk
runs = {"sst2": "results/analysis/sst2-joint-per_ramp-e3/logits.npy", "mrpc": "results/analysis/mrpc-joint/logits.npy",
        "cifar": "results/vision/cifar10-resnet56/logits.npy"}
tmp = tempfile.mkdtemp()
for name, path in runs.items():
    lg = np.load(path); L, N, C = lg.shape
    rng = np.random.default_rng(12345)
    viol, sav = 0, []
    D = 100
    for d in range(D):
        perm = rng.permutation(N); cal, rep = perm[:N//2], perm[N//2:]
        f = os.path.join(tmp, "cal.npz"); np.savez(f, logits=lg[:, cal])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            calibrate.run(["--outputs", f, "--policy", "entropy", "--risk", "consistency", "--max-risk", "0.02", "--risk-delta", "0.1"])
        res = json.loads(out.getvalue().strip().splitlines()[-1])
        pol = policies.make_policy(res["policy"], L, C, **res["params"])
        ev = offline.evaluate(pol, lg[:, rep])
        full = offline.ramp_predictions(lg[:, rep])[-1]
        r = np.mean(ev.prediction != full)
        viol += r > 0.02; sav.append(ev.saving)
    print(name, "violations", viol, "/", D, "mean saving", round(float(np.mean(sav)), 4))
