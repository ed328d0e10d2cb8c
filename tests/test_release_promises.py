"""What the release promises the user: no uncertified solution shipped without consent, dropped and
exempted concepts said in words, the price of balance on the user's own data, streaming not offered
where it cannot meet the gaps."""
import json

import numpy as np
import pytest

from pipeline import cli, plan
from pipeline.signatures import SignatureTable
from solvers import max_keep_rate
from solvers.problem import BalanceProblem

BEARD = "beard"


def _table():
    """'beard' is 66 annotated rows, all men; 'kitchen' leans to women; many rows show nobody."""
    return SignatureTable.from_records([
        {"attributes": ["perceived_gender:man"], "concepts": [BEARD], "utility": None, "count": 66},
        {
            "attributes": ["perceived_gender:man"], "concepts": ["kitchen"], "utility": None,
            "count": 60
        },
        {
            "attributes": ["perceived_gender:woman"], "concepts": ["kitchen"], "utility": None,
            "count": 140
        },
        {"attributes": ["perceived_gender:man"], "concepts": [], "utility": None, "count": 400},
        {"attributes": ["perceived_gender:woman"], "concepts": [], "utility": None, "count": 330},
        {"attributes": [], "concepts": [], "utility": None, "count": 1000},
    ])


def test_a_concept_the_plan_drops_is_named_with_its_support_and_reason():
    solution, _ = plan.solve_table(_table(), plan.BalanceConfig(keep_rate=0.8,
                                                                association_gap=0.05))
    [dropped] = solution.statistics["dropped_concepts"]
    assert dropped["concept"] == BEARD and dropped["support"] == 66
    assert dropped["reason"] == (
        "'beard': all 66 annotated rows are 'man'; balancing it to 50% ± 5% is only "
        "possible by dropping it")
    after = solution.statistics["data_bias_after"]["summary"]
    assert after["concepts_dropped"] == [BEARD]
    # The AB summary measures what is kept: 'kitchen' at its gap, not 'beard' at 0.5 from rows with
    # q ~ 1e-12.
    assert after["association_bias_max"] <= 0.05 + 1e-6


def test_an_exempted_concept_is_not_constrained_and_is_listed(tmp_path):
    config = plan.BalanceConfig(keep_rate=0.8, association_gap=0.05, unconstrained=[BEARD, "bride"])
    solution, projected = plan.solve_table(_table(), config)
    assert BEARD not in solution.spec.concept_names
    assert solution.statistics["dropped_concepts"] == []
    listed = {entry["concept"]: entry for entry in solution.statistics["unconstrained_concepts"]}
    assert listed[BEARD]["support"] == 66 and listed[BEARD]["shares"]["perceived_gender:man"] == 1.0
    assert listed["bride"]["seen"] is False
    # beard rows are kept like any other annotated man without a constrained concept
    values = [projected.attribute_names[int(np.argmax(row))] for row in projected.attributes]
    beard_row = [i for i, value in enumerate(values)
                 if projected.concepts[i].sum() == 0 and value == "perceived_gender:man"]
    assert solution.q[beard_row].min() > 0.5


def test_the_price_of_balance_is_the_lp_maximum_at_each_gap():
    table = _table()
    config = plan.BalanceConfig(representation_gap=0.05)
    curve = plan.price_of_balance(plan.build_problem(table, config)[1], config)
    assert [point["association_gap"] for point in curve] == list(plan.PRICE_OF_BALANCE_GAPS)
    rates = [point["max_keep_rate"] for point in curve]
    assert all(a <= b + 1e-9 for a, b in zip(rates, rates[1:])) and rates[0] < rates[-1]
    for point in curve:  # the same LP, on a problem built here from the table directly
        problem = BalanceProblem(table.attributes, table.concepts, weights=table.weights,
                                 groups=table.groups, keep_rate=1.0, representation_gap=0.05,
                                 association_gap=point["association_gap"],
                                 attribute_names=table.attribute_names,
                                 concept_names=table.concept_names, group_names=table.group_names)
        assert point["max_keep_rate"] == pytest.approx(max_keep_rate(problem), abs=1e-9)


def test_streaming_is_refused_by_balance_in_one_line(tmp_path, capsys):
    assert cli.main([
        "balance", "--annotations", str(tmp_path), "--output", str(tmp_path / "s.json"), "--method",
        "streaming"
    ]) == 2
    error = capsys.readouterr().err.strip()
    assert "--method streaming is not offered by balance" in error and error.count("\n") == 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("promises")
    rows = [{"key": f"k{i}", "caption": "a man" if i % 2 else "a woman"} for i in range(60)]
    table = work / "captions.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = work / "run"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "0.8",
                     "--min-support", "1"]) == 0
    return table, output


def test_an_uncertified_solution_is_not_released_without_consent(small_run, tmp_path, capsys):
    table, output = small_run
    solution = json.loads((output / "solution.json").read_text())
    assert solution["status"] == "optimal"
    solution["status"] = "not_converged"
    solution["statistics"]["certified_violation"] = 0.12
    uncertified = tmp_path / "solution.json"
    uncertified.write_text(json.dumps(solution))
    command = ["resample", "--input", str(table), "--annotations", str(output / "annotations"),
               "--solution", str(uncertified), "--output", str(tmp_path / "release")]
    assert cli.main(command) == 1
    error = capsys.readouterr().err.strip()
    assert "not a certified solution" in error and "off its gap by up to 0.12" in error
    assert "--allow-approximate" in error and error.count("\n") == 0
    assert not (tmp_path / "release" / "manifest.json").exists()
    assert cli.main([*command, "--allow-approximate"]) == 0
    manifest = json.loads((tmp_path / "release" / "manifest.json").read_text())
    assert manifest["solution_status"] == "not_converged"
    assert "NOT certified" in manifest["certificate"]


def test_the_card_and_the_report_state_the_certificate(small_run):
    _, output = small_run
    card = (output / "release" / "README.md").read_text()
    page = (output / "release" / "report.html").read_text()
    for text in (card, page):
        assert "every constrained value is within its gap" in text
    assert "price of balance" in page
