"""The few lines a run ends with: what early exit bought on this run, where the files are, what to run next.

`final_screen(summary, workdir)` reads only an evaluation summary (`evaluator.early_exit_evaluation`), so
experiments/train.py and experiments/evaluate.py print the same screen, with the same figures as the summary
and the README's table for that run.
"""

from __future__ import annotations

import os


def _speedup(value: float) -> str:
  return f'{value:.2f}x'


def _guarantee(summary: dict) -> str:
  """The calibrated threshold's guarantee, in words."""
  cal = summary.get('calibration')
  reference = 'the full model' if summary.get('calibration_reference') == 'full_model' else 'the ground truth'
  if not cal:
    return f"threshold {summary['threshold']:g} was set by hand (eval.threshold): no guarantee"
  if cal.get('index') is None:
    return (f"no threshold met the risk bound on {cal['n']} calibration examples: every token runs at full depth "
            '(train the exits longer or allow more risk with eval.risk_delta)')
  if cal['method'] == 'ltt':
    return (f"threshold {summary['threshold']:.4g}: with probability >= {1 - cal['epsilon']:g}, answers differ from "
            f"{reference} on at most {100 * cal['delta']:g}% of inputs (Learn-then-Test, {cal['n']} calibration "
            'examples)')
  return (f"threshold {summary['threshold']:.4g}: expected disagreement with {reference} <= {100 * cal['delta']:g}% "
          f"(conformal risk control, {cal['n']} calibration examples)")


def final_screen(summary: dict, workdir: str) -> str:
  """The run's last screen (module docstring)."""
  layers = summary['num_layers']
  metric = summary['quality_metric']
  timing = summary['timing']
  rows = [('full depth', f"{summary['quality_full']:.3f}", f'{layers}', '1.00x'),
          (f"early exit (threshold {summary['threshold']:.4g})", f"{summary['quality_early_exit']:.3f}",
           f"{layers / summary['speedup_layers']:.2f}", _speedup(summary['speedup_decode_wallclock']))]
  spec = summary.get('speculative')
  if spec:
    same = 'identical tokens' if spec['identical_to_full'] else 'NOT identical: a bug'
    rows.append((f"speculative (exit {spec['draft_layer']} drafts {spec['max_draft']})", f"{spec['quality']:.3f}",
                 same, _speedup(spec['speedup_decode_wallclock'])))
  head = ('', metric, 'layers per token', 'decode speedup')
  widths = [max(len(r[i]) for r in (head, *rows)) + 2 for i in range(4)]
  table = [''.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (head, *rows)]
  eval_dir = os.path.join(workdir, 'eval')
  lines = [
      '',
      f"Early exit on {summary['num_test']} test examples (exits after layers "
      f"{'/'.join(map(str, summary['exit_layers']))} of {layers}):",
      *('  ' + line for line in table),
      f"  {_guarantee(summary)}.",
      f"  Decode speedup: measured wall clock against full depth on this machine ({timing['backend']}, batch "
      f"{timing['batch_size']}, medians of {timing['decode']['repeats']} interleaved passes); "
      f"{summary['speedup_layers']:.2f}x fewer layers, {summary['speedup_ideal']:.2f}x fewer weight bytes read.",
      f"Summary: {os.path.join(eval_dir, 'summary.json')}",
      f"Plots:   {os.path.join(eval_dir, '*.png')} (quality vs speedup, per-layer quality, exit histogram, modes)",
      'Next:    python -c "import free_jax; vlm = free_jax.EarlyExitVLM.load(\'' + workdir + '\'); '
      'print(vlm.generate(\'image.png\', [\'how many circles are there?\']).texts)"',
  ]
  return '\n'.join(lines)
