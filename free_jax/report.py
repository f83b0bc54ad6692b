"""`make report`: every figure the README quotes, regenerated from fresh runs by one command.

`make_report(workdir)` runs (or reuses, when finished with the same settings) the default VQA run and the caption
run on the shipped default backbone and the reproduction study on the small one, then writes

  docs/results.md   the default run per question type and layer, both runs' quality vs measured speedup, the
                    study's table and claims, each with the command and commit that made it;
  docs/figures/     the plots those sections show;
  README.md         the section between `BEGIN`/`END` markers: the headline figures, with the commit.

Runs are library calls (`pipeline.train_and_evaluate`, `reproduce.run_study`), so a finished workdir costs
nothing to report again; ``train_eval.json`` of a run is deterministic on CPU (the same command twice gives the
same file), the wall-clock figures in ``eval/`` are measured anew only when their inputs change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence

import ml_collections

from free_jax import reproduce, shipped
from free_jax.eval import evaluator
from free_jax.training import pipeline

BEGIN = '<!-- BEGIN make report -->'
END = '<!-- END make report -->'
RESULTS_FILE = 'results.md'
FIGURES_DIR = 'figures'


@dataclasses.dataclass(frozen=True)
class Runs:
  """The report's inputs: the two runs' experiment configs, the study's config and its grid."""

  vqa: ml_collections.ConfigDict
  caption: ml_collections.ConfigDict
  study: ml_collections.ConfigDict
  grid: reproduce.Grid


def _per_type_table(summary: dict) -> list[str]:
  per_type = summary.get('per_type', {})
  if not per_type:
    return []
  layers = len(next(iter(per_type.values()))['per_layer_naive'])
  exits = summary['exit_layers']
  header = (['question type', 'n', 'majority'] + [f'L{l}' for l in range(1, layers + 1)]
            + [f'exit{l}' for l in exits] + ['full (generated)', 'early exit'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for kind, row in per_type.items():
    values = ([kind, str(row['count']), f"{row['majority_answer']:.2f}"]
              + [f'{v:.2f}' for v in row['per_layer_naive']] + [f'{v:.2f}' for v in row['per_exit'][:-1]]
              + [f"{row['full']:.3f}", f"{row['early_exit']:.3f}"])
    lines.append('| ' + ' | '.join(values) + ' |')
  return lines


def format_distinct(values: Sequence[float]) -> list[str]:
  """`values` with the fewest decimals (2 to 6) that keep different values different (thresholds near 1)."""
  for decimals in range(2, 7):
    texts = [f'{v:.{decimals}f}' for v in values]
    if len(set(texts)) == len(set(values)):
      return texts
  return [f'{v:g}' for v in values]


def _run_lines(name: str, summary: dict, command: str) -> list[str]:
  metric = summary['quality_metric']
  lines = [f'## {name}', '', f'`{command}`', '',
           f"Full depth {metric} **{summary['quality_full']:.4g}**; early exit at the calibrated threshold "
           f"{summary['threshold']:.4g}: {summary['quality_early_exit']:.4g} at "
           f"**{summary['speedup_decode_wallclock']:.2f}x measured decode** "
           f"({summary['speedup_layers']:.2f}x in layers, {summary['speedup_end_to_end_wallclock']:.2f}x end to end, "
           f"batch {summary['timing']['batch_size']}, {summary['timing']['examples']} test examples timed, "
           f"backend {summary['timing']['backend']}).", '',
           '| threshold | ' + metric + ' | measured decode speedup | layer speedup |', '|---|---|---|---|']
  thresholds = format_distinct([s['threshold'] for s in summary['sweep']])
  lines += [f"| {t} | {s['quality']:.4g} | {s['speedup_decode_wallclock']:.2f}x | {s['speedup_layers']:.2f}x |"
            for t, s in zip(thresholds, summary['sweep'])]
  spec = summary.get('speculative')
  if spec:
    lines += ['', f"Speculative (exit after layer {spec['draft_layer']}, k = {spec['max_draft']}): {metric} "
                  f"{spec['quality']:.4g}, acceptance {spec['acceptance']:.3f}, "
                  f"{spec['speedup_decode_wallclock']:.2f}x measured decode."]
  table = _per_type_table(summary)
  if table:
    lines += ['', 'Teacher-forced answer accuracy per question type at every layer through the frozen head (L1..),'
                  ' at the trained exits, and generated-answer accuracy at full depth and with early exit:', '',
              *table]
  return lines


def _figure(workdir: str, name: str, figures: str, prefix: str) -> str:
  target = os.path.join(figures, f'{prefix}_{name}')
  shutil.copyfile(os.path.join(workdir, evaluator.EVAL_DIR, name), target)
  return target


def make_report(runs: Runs, workdir: str, docs_dir: str = 'docs', readme: str | None = 'README.md',
                results_dir: str = 'results', log: Callable[[str], None] = print, study: bool = True) -> dict:
  """Runs (or reuses) everything and writes the report (module docstring); returns the summaries.

  Args:
    runs: the configs and the grid (experiments/report.py: experiments/configs/{vqa,caption}.py, the study on
      vqa.py:small, 3 seeds).
    workdir: holds ``vqa/``, ``caption/`` and ``study/`` (its rows in ``study/reproduce/``).
    docs_dir: where results.md and figures/ go.
    readme: the README whose marked section is rewritten (None: left alone).
    results_dir: the study's output (`reproduce.write_results`).
    log: progress lines.
    study: run (or reuse) the study; False keeps the study results already in `results_dir` (written by
      experiments/reproduce.py, which names its own commit) and regenerates only the two runs.
  """
  if readme is not None:
    with open(readme) as f:
      text = f.read()
    if BEGIN not in text or END not in text:
      raise ValueError(f'{readme} has no {BEGIN} ... {END} section to regenerate')
  for config in (runs.vqa, runs.caption):
    pipeline.validate_config(config)
  if study:
    reproduce.validate(runs.study, runs.grid)
  elif not os.path.isfile(os.path.join(results_dir, reproduce.JSON_FILE)):
    raise FileNotFoundError(f'{os.path.join(results_dir, reproduce.JSON_FILE)} not found: run the study (study=True)')
  made_at = shipped.commit()
  summaries = {}
  for name, config in (('vqa', runs.vqa), ('caption', runs.caption)):
    log(f'[report] {name} run in {os.path.join(workdir, name)}')
    summaries[name] = pipeline.train_and_evaluate(config, os.path.join(workdir, name),
                                                  evaluators=[evaluator.early_exit_evaluation])
  if study:
    log('[report] reproduction study')
    rows = reproduce.run_study(runs.study, os.path.join(workdir, 'study'), runs.grid, out_dir=results_dir, log=log)
  else:
    with open(os.path.join(results_dir, reproduce.JSON_FILE)) as f:
      rows = json.load(f)

  figures = os.path.join(docs_dir, FIGURES_DIR)
  os.makedirs(figures, exist_ok=True)
  vqa, cap = (summaries[k]['early_exit_evaluation'] for k in ('vqa', 'caption'))
  lines = ['# Results', '', f'Made by `make report` at commit {made_at} (figures of this machine: '
           f'{vqa["timing"]["backend"]}). Every number here comes from the runs below; rerun the command to '
           'regenerate them.', '']
  lines += _run_lines('Default VQA run', vqa, 'python experiments/train.py --config=experiments/configs/vqa.py')
  shown = [_figure(os.path.join(workdir, 'vqa'), png, figures, 'vqa') for png in
           ('per_type_per_layer.png', 'quality_vs_speedup.png', 'modes.png')]
  lines += ['', *[f'![{os.path.basename(p)}]({FIGURES_DIR}/{os.path.basename(p)})' for p in shown], '']
  lines += _run_lines('Caption run', cap, 'python experiments/train.py --config=experiments/configs/caption.py')
  shown = [_figure(os.path.join(workdir, 'caption'), png, figures, 'caption') for png in
           ('quality_vs_speedup.png', 'modes.png')]
  lines += ['', *[f'![{os.path.basename(p)}]({FIGURES_DIR}/{os.path.basename(p)})' for p in shown], '']
  with open(os.path.join(results_dir, reproduce.MARKDOWN_FILE)) as f:
    study_text = f.read().replace('# FREE reproduction on the embedded benchmark', '## Reproduction study', 1)
  seeds = sorted({s for r in rows for s in r['seeds']})
  lines += [f'`python experiments/reproduce.py --workdir=WORKDIR --seeds={",".join(map(str, seeds))} '
            f'--out={results_dir}` (small backbone; figures in {results_dir}/)', '', study_text]
  with open(os.path.join(docs_dir, RESULTS_FILE), 'w') as f:
    f.write('\n'.join(lines))

  if readme is not None:
    free10 = next((r for r in rows if r['method'] == 'free' and r['label_fraction'] == 0.1), rows[0])
    section = [BEGIN, f'Regenerated by `make report` at commit {made_at} (details: `docs/{RESULTS_FILE}`).', '',
               '| run | full depth | early exit (calibrated) | measured decode speedup | layer speedup |',
               '|---|---|---|---|---|',
               f"| default VQA (exact match) | {vqa['quality_full']:.3f} | {vqa['quality_early_exit']:.3f} | "
               f"{vqa['speedup_decode_wallclock']:.2f}x | {vqa['speedup_layers']:.2f}x |",
               f"| caption (CIDEr) | {cap['quality_full']:.3f} | {cap['quality_early_exit']:.3f} | "
               f"{cap['speedup_decode_wallclock']:.2f}x | {cap['speedup_layers']:.2f}x |",
               f"| study (small backbone): FREE, {100 * free10['label_fraction']:g}% labels, {len(free10['seeds'])} seeds | "
               f"{free10['quality_full']:.3f} | {free10['quality']:.3f} ± {free10['quality_ci95']:.3f} | "
               f"{free10['speedup_decode_wallclock']:.2f}x | {free10['speedup_layers']:.2f}x |", END]
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(readme, 'w') as f:
      f.write(text[:start] + '\n'.join(section) + text[end:])
  return {'summaries': summaries, 'rows': rows, 'commit': made_at}
