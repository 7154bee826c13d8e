"""Growth formulas against the publications' printed tables and hand arithmetic on the printed equations."""

import numpy as np
import pytest
from scipy.stats import norm

from fetaliqa.evaluation.growth import (HADLOCK_AC_RANGE_MM, ac_centile, ac_z_score, hadlock_ga_weeks,
                                        intergrowth_ac_mean_sd_mm)

# INTERGROWTH-21st Project, fetal growth standards, "Abdominal circumference: centiles" table
# (GROW_Fetal-ct_ac_Table.pdf, intergrowth21.tghn.org, 2017): AC in mm at exact weeks, printed to 0.1 mm.
# Values read from the two independent transcriptions of that PDF in github.com/P2GX/prenatalppkt
# (data/parsed/intergrowth_text/intergrowth21_ac_ct.tsv and
# data/parsed/intergrowth21_docling_parse/intergrowth21_ac_ct.tsv), which agree on every value.
CENTILES = (3, 5, 10, 50, 90, 95, 97)
AC_CENTILE_TABLE = {
    14: (72.9, 73.8, 75.3, 80.6, 85.9, 87.4, 88.4),
    16: (93.0, 94.3, 96.3, 103.2, 110.1, 112.1, 113.4),
    20: (133.4, 135.2, 138.0, 147.7, 157.5, 160.3, 162.1),
    24: (173.3, 175.6, 179.0, 191.2, 203.3, 206.8, 209.0),
    28: (212.1, 214.7, 218.8, 233.3, 247.8, 251.9, 254.5),
    32: (248.4, 251.6, 256.5, 273.9, 291.3, 296.3, 299.5),
    36: (280.8, 284.8, 291.0, 312.8, 334.6, 340.9, 344.9),
    40: (307.7, 312.9, 321.1, 349.8, 378.5, 386.7, 392.0),
}
# The same project's "Abdominal circumference: z-scores" table (GROW_Fetal-zs_ac_Table.pdf), AC in mm
# at -3..+3 SD (prenatalppkt, data/parsed/intergrowth_text/intergrowth21_ac_zs.tsv).
Z_SCORES = (-3, -2, -1, 0, 1, 2, 3)
AC_Z_TABLE = {
    14: (68.2, 72.4, 76.5, 80.6, 84.7, 88.9, 93.0),
    20: (124.8, 132.5, 140.1, 147.7, 155.4, 163.0, 170.6),
    28: (199.4, 210.7, 222.0, 233.3, 244.6, 255.9, 267.2),
    40: (282.6, 305.0, 327.4, 349.8, 372.2, 394.6, 417.1),
}
# Both tables print 0.1 mm. The z-score table is mean + z SD rounded to 0.1 mm, so it agrees within 0.05 mm;
# the centile table agrees within 0.07 mm, a little more than its rounding (its normal quantiles were
# probably rounded too: with 1.88, 1.645, 1.28 it agrees within 0.052 mm), so it is held to 0.1 mm.
Z_TABLE_TOLERANCE_MM = 0.05 + 1e-9
CENTILE_TABLE_TOLERANCE_MM = 0.1
SMALLEST_TABLE_SD_MM = 4.1  # 14 weeks: (84.7 - 76.5) / 2 in the z-score table; an error in mm / SD is one in z


@pytest.mark.parametrize("week", sorted(AC_CENTILE_TABLE))
def test_mean_and_sd_give_the_printed_centile_table(week):
    mean, sd = intergrowth_ac_mean_sd_mm(week)
    for centile, printed in zip(CENTILES, AC_CENTILE_TABLE[week]):
        computed = mean + norm.ppf(centile / 100) * sd
        assert computed == pytest.approx(printed, abs=CENTILE_TABLE_TOLERANCE_MM), centile


@pytest.mark.parametrize("week", sorted(AC_Z_TABLE))
def test_mean_and_sd_give_the_printed_z_score_table(week):
    mean, sd = intergrowth_ac_mean_sd_mm(week)
    for z, printed in zip(Z_SCORES, AC_Z_TABLE[week]):
        assert mean + z * sd == pytest.approx(printed, abs=Z_TABLE_TOLERANCE_MM), z


def test_the_printed_equations_by_hand_at_20_weeks():
    # mean = -81.3243 + 11.6772*20 - 0.000561865*8000 = -81.3243 + 233.544 - 4.49492 = 147.72478
    # SD = -4.36302 + 0.121445*400 - 0.0130256*8000 + 0.00282143*8000*ln 20
    #    = -4.36302 + 48.578 - 104.2048 + 22.57144*2.9957323 = 7.62817
    mean, sd = intergrowth_ac_mean_sd_mm(20.0)
    assert mean == pytest.approx(147.72478, abs=1e-5)
    assert sd == pytest.approx(7.62817, abs=1e-4)


def test_printed_centiles_and_z_scores_read_back():
    for week, row in AC_CENTILE_TABLE.items():
        for centile, printed in zip(CENTILES, row):
            assert ac_z_score(printed, week) == pytest.approx(
                norm.ppf(centile / 100), abs=CENTILE_TABLE_TOLERANCE_MM / SMALLEST_TABLE_SD_MM)
    for week, row in AC_Z_TABLE.items():
        assert ac_z_score(np.array(row), week) == pytest.approx(
            np.array(Z_SCORES, dtype=float), abs=Z_TABLE_TOLERANCE_MM / SMALLEST_TABLE_SD_MM)


def test_the_50th_centile_is_z_0_and_the_97th_is_z_1_88():
    for week in (14, 20, 27.5, 33, 40):
        mean, sd = intergrowth_ac_mean_sd_mm(week)
        assert ac_z_score(mean, week) == pytest.approx(0, abs=1e-12)
        assert ac_centile(mean, week) == pytest.approx(50, abs=1e-10)
        assert ac_centile(mean + 1.8808 * sd, week) == pytest.approx(97, abs=0.01)
    # the printed 97th centile at 20 weeks, 162.1 mm: z = (162.1 - 147.725) / 7.628 = 1.885
    assert ac_z_score(162.1, 20) == pytest.approx(1.88, abs=0.01)
    assert ac_centile(162.1, 20) == pytest.approx(97, abs=0.1)
    assert ac_centile(133.4, 20) == pytest.approx(3, abs=0.1)  # the printed 3rd centile


def test_intergrowth_is_nan_outside_14_to_40_weeks_and_for_missing_values():
    mean, sd = intergrowth_ac_mean_sd_mm([13.9, 14.0, 40.0, 40.1, None, np.nan])
    assert np.isnan(mean).tolist() == [True, False, False, True, True, True]
    assert np.isnan(sd).tolist() == [True, False, False, True, True, True]
    assert np.isnan(ac_z_score(None, 20)) and np.isnan(ac_z_score(150, None))
    assert np.isnan(ac_centile(np.nan, 20)) and np.isnan(ac_centile(150, 41))


def test_hadlock_against_hand_arithmetic_on_the_printed_equation():
    # GA = 8.14 + 0.753 AC + 0.0036 AC^2, AC in cm
    hand = {
        100: 8.14 + 7.53 + 0.36,     # 10 cm -> 16.03
        150: 8.14 + 11.295 + 0.81,   # 15 cm -> 20.245
        200: 8.14 + 15.06 + 1.44,    # 20 cm -> 24.64
        250: 8.14 + 18.825 + 2.25,   # 25 cm -> 29.215
        300: 8.14 + 22.59 + 3.24,    # 30 cm -> 33.97
        350: 8.14 + 26.355 + 4.41,   # 35 cm -> 38.905
    }
    for ac_mm, weeks in hand.items():
        assert hadlock_ga_weeks(ac_mm) == pytest.approx(weeks, abs=1e-9), ac_mm


def test_hadlock_is_nan_where_the_implied_age_leaves_the_fitted_14_to_42_weeks():
    # 7.5 cm -> 8.14 + 5.6475 + 0.2025 = 13.99 (< 14); 7.6 cm -> 14.0707
    # 38.0 cm -> 41.9524; 38.1 cm -> 8.14 + 28.6893 + 5.225796 = 42.0551 (> 42)
    ga = hadlock_ga_weeks([75, 76, 380, 381, 0, -100, None, np.nan])
    assert np.isnan(ga).tolist() == [True, False, False, True, True, True, True, True]
    assert ga[1] == pytest.approx(14.070736) and ga[2] == pytest.approx(41.9524)
    low, high = HADLOCK_AC_RANGE_MM
    assert 75 < low < 76 and 380 < high < 381
    assert hadlock_ga_weeks(low) == pytest.approx(14) and hadlock_ga_weeks(high) == pytest.approx(42)


def test_vectorised_shapes_and_scalar_returns():
    assert isinstance(hadlock_ga_weeks(200), float) and isinstance(ac_centile(150, 20), float)
    acs = np.array([[100.0, 200.0], [300.0, np.nan]])
    assert hadlock_ga_weeks(acs).shape == (2, 2)
    np.testing.assert_allclose(hadlock_ga_weeks(acs).ravel()[:3], [16.03, 24.64, 33.97])
    weeks = np.array([20.0, 28.0, 36.0])
    mean, sd = intergrowth_ac_mean_sd_mm(weeks)
    assert mean.shape == sd.shape == (3,)
    # each element equals its scalar call; (2, 1) x (3,) broadcasts to (2, 3)
    grid = ac_centile(np.array([[150.0], [250.0]]), weeks)
    assert grid.shape == (2, 3)
    for i, ac in enumerate((150.0, 250.0)):
        for j, week in enumerate(weeks):
            assert grid[i, j] == ac_centile(ac, week)
