# Short documents (300-2500 bytes of arithmetic lines) so that 4096-token batches cross several boundaries.
import os, random
r = random.Random(0)
os.makedirs("/tmp/docs", exist_ok=True)
for i in range(3000):
    n, lines = r.randint(300, 2500), []
    while sum(len(s) + 1 for s in lines) < n:
        a, b = r.randint(0, 999), r.randint(0, 999)
        op = r.choice("+-*")
        lines.append(f"{a}{op}{b}={eval(f'{a}{op}{b}')}")
    open(f"/tmp/docs/doc{i:04d}.txt", "w").write("\n".join(lines) + "\n")
