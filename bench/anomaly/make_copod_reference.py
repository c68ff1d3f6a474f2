import numpy as np, sys
from pyod.models.copod import COPOD
for name in ["adbench__42_WBC", "adbench__29_Pima", "adbench__6_cardio"]:
    a = np.loadtxt(f"tests/fixtures/anomaly/data/{name}.csv", delimiter=",", skiprows=1)
    s = COPOD().fit(a[:, :-1]).decision_scores_
    np.savetxt(f"tests/fixtures/anomaly/reference/{name}.copod_train.csv", s, fmt="%.17g", header="copod_score", comments="")
