"""What an abdominal circumference (AC) means for gestational age and growth: published formulas, numpy only.

Research use, not diagnosis. These are population formulas applied to an AC that a model measured on a
frame it chose; no clinical decision should rest on them.

Every function takes scalars or array-likes (lists, numpy arrays; None and NaN are missing) and is
vectorised: it returns a float64 ndarray of the broadcast input shape, or a numpy float for scalar
inputs. A missing input, or one outside the formula's valid range, gives NaN (never a clipped value).

Gestational age from AC alone: Hadlock et al., Radiology 1984 (`CITATIONS["hadlock_1984"]`)
    GA [weeks] = 8.14 + 0.753 AC + 0.0036 AC^2,   AC in cm (this module takes mm and divides by 10).
    The regression was fitted on 361 fetuses of 14 to 42 menstrual weeks; the paper states that range of
    ages, not a range of AC. `hadlock_ga_weeks` therefore returns NaN where the GA it implies falls
    outside 14-42 weeks, that is for AC outside about 75.1-380.5 mm (`HADLOCK_AC_RANGE_MM`). It is an
    estimate, not a dating: the paper's introduction notes that single parameters, AC among them, vary
    like the BPD, whose error reaches about +-3.6 weeks (2 SD) in the last six weeks of pregnancy.

AC for gestational age: the INTERGROWTH-21st fetal growth standard, Papageorghiou et al., Lancet 2014
(`CITATIONS["intergrowth_21st_fetal_growth"]`), fitted mean and SD of AC (mm) in exact weeks of GA:
    mean [mm] = -81.3243 + 11.6772 GA - 0.000561865 GA^3
    SD   [mm] = -4.36302 + 0.121445 GA^2 - 0.0130256 GA^3 + 0.00282143 GA^3 ln(GA)
    valid for GA 14-40 exact weeks (inclusive); NaN outside. AC is normally distributed at each GA, so
        z = (AC - mean) / SD,     centile = 100 Phi(z)    (Phi: the standard normal CDF).
    The coefficients are the paper's as transcribed by the gigs R package (github.com/lshtm-gigs/gigs,
    R/ig_fet.R, standard "acfga", which cites this paper; other independent ports agree), and they
    reproduce the INTERGROWTH-21st Project's published AC z-score table to its 0.1 mm rounding and its
    centile table within 0.07 mm (`CITATIONS["intergrowth_21st_ac_tables"]`; tests/test_growth.py).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

CITATIONS = {
    "hadlock_1984": (
        "Hadlock FP, Deter RL, Harrist RB, Park SK. Estimating fetal age: computer-assisted analysis of "
        "multiple fetal growth parameters. Radiology 1984;152(2):497-501. "
        "doi:10.1148/radiology.152.2.6739822"),
    "intergrowth_21st_fetal_growth": (
        "Papageorghiou AT, Ohuma EO, Altman DG, Todros T, Cheikh Ismail L, Lambert A, et al. International "
        "standards for fetal growth based on serial ultrasound measurements: the Fetal Growth Longitudinal "
        "Study of the INTERGROWTH-21st Project. Lancet 2014;384(9946):869-79. "
        "doi:10.1016/S0140-6736(14)61490-2"),
    "intergrowth_21st_ac_tables": (
        "INTERGROWTH-21st Project. Fetal growth standards, abdominal circumference: centiles and z-scores "
        "by exact gestational age, 14-40 weeks. Oxford: INTERGROWTH-21st, 2017. "
        "https://media.tghn.org/medialibrary/2017/03/GROW_Fetal-ct_ac_Table.pdf and "
        "https://media.tghn.org/medialibrary/2017/03/GROW_Fetal-zs_ac_Table.pdf"),
}

HADLOCK_GA_RANGE_WEEKS = (14.0, 42.0)  # menstrual ages of the 361 fetuses the regression was fitted on
INTERGROWTH_GA_RANGE_WEEKS = (14.0, 40.0)  # exact weeks covered by the standard


def _hadlock_ac_cm_for_ga(ga_weeks: float) -> float:
    """The AC (cm) at which Hadlock's AC regression gives `ga_weeks`: the positive root of the quadratic."""
    a, b, c = 0.0036, 0.753, 8.14 - ga_weeks
    return (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)


# The AC range (mm) whose implied GA lies within the fitted 14-42 weeks: about (75.1, 380.5).
HADLOCK_AC_RANGE_MM = tuple(float(10 * _hadlock_ac_cm_for_ga(w)) for w in HADLOCK_GA_RANGE_WEEKS)


def _as_float_array(values) -> np.ndarray:
    """values (scalar, list, ndarray; None means missing) -> float64 ndarray, None -> NaN."""
    return np.asarray(values, dtype=np.float64)


def _unwrap(result: np.ndarray):
    """A 0-d result as a numpy float, any other as the ndarray itself."""
    return result[()]


def hadlock_ga_weeks(ac_mm):
    """Gestational age in weeks implied by AC alone (Hadlock 1984); NaN outside `HADLOCK_AC_RANGE_MM`.

    ac_mm: scalar or array-like of AC in mm, any shape. Returns float64 of the same shape (a numpy float
    for a scalar), NaN where AC is missing or its implied GA is outside the fitted 14-42 weeks.
    """
    ac = _as_float_array(ac_mm)
    low, high = HADLOCK_AC_RANGE_MM
    # comparisons with NaN are False, so missing values stay NaN through the where
    ac_cm = np.where((ac >= low) & (ac <= high), ac, np.nan) / 10
    return _unwrap(8.14 + 0.753 * ac_cm + 0.0036 * ac_cm**2)


def intergrowth_ac_mean_sd_mm(ga_weeks):
    """INTERGROWTH-21st mean and SD of AC (mm) at gestational age `ga_weeks` (exact weeks, 14-40).

    ga_weeks: scalar or array-like, any shape. Returns (mean, sd), each float64 of that shape (numpy
    floats for a scalar), NaN where GA is missing or outside 14-40 weeks.
    """
    ga = _as_float_array(ga_weeks)
    low, high = INTERGROWTH_GA_RANGE_WEEKS
    ga = np.where((ga >= low) & (ga <= high), ga, np.nan)
    mean = -81.3243 + 11.6772 * ga - 0.000561865 * ga**3
    sd = -4.36302 + 0.121445 * ga**2 - 0.0130256 * ga**3 + 0.00282143 * ga**3 * np.log(ga)
    return _unwrap(mean), _unwrap(sd)


def ac_z_score(ac_mm, ga_weeks):
    """z-score of AC (mm) for GA (exact weeks) on the INTERGROWTH-21st standard: (AC - mean) / SD.

    ac_mm, ga_weeks: scalars or array-likes that broadcast together. Returns float64 of the broadcast
    shape (a numpy float for scalars), NaN where either is missing or GA is outside 14-40 weeks.
    """
    mean, sd = intergrowth_ac_mean_sd_mm(ga_weeks)
    return _unwrap((_as_float_array(ac_mm) - mean) / sd)


def ac_centile(ac_mm, ga_weeks):
    """Centile (0-100) of AC (mm) for GA (exact weeks) on the INTERGROWTH-21st standard: 100 Phi(z).

    Same inputs, shape and NaN rules as `ac_z_score`.
    """
    return _unwrap(100 * norm.cdf(ac_z_score(ac_mm, ga_weeks)))
