# The Spearman ρ as the Lyra repository's examples/run_relso.ipynb reports it: the test file in its own order,
# cut into batches of 512 rows, one ρ per batch, their mean. (The notebook then reports the maximum of that
# over 500 epochs, i.e. selected on the test set; this script scores one set of predictions.)
#   python3 scripts/experiments/lyra_paper_metric.py PREDICTIONS.csv LABEL_COLUMN [BATCH]
# PREDICTIONS.csv: the output of `ouro predict` (the input rows plus a `prediction` column).
import csv, sys

def ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r

def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / (saa * sbb) ** 0.5

def spearman(a, b):
    return pearson(ranks(a), ranks(b))

path, label = sys.argv[1], sys.argv[2]
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 512
rows = list(csv.DictReader(open(path)))
if not rows or label not in rows[0] or "prediction" not in rows[0]:
    sys.exit(f"{path}: needs the columns '{label}' and 'prediction'")
y = [float(r[label]) for r in rows]
p = [float(r["prediction"]) for r in rows]
per = [spearman(p[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
print(f"rows {len(y)}, batches of {batch}: {len(per)}; whole-set spearman {spearman(p, y):.4f}; "
      f"batch-mean spearman {sum(per) / len(per):.4f} (per batch: {', '.join(f'{v:.3f}' for v in per)})")
