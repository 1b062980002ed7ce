"""Evaluate, sweep and serve a trained run's energy correction.

    python correct.py [eval] --ckpt RUN[/checkpoints/STEP] [--data DIR] [--frames 64]
                             [--alpha-sweep 0.01,0.03,0.1,0.3 --steps 1,3,5] [--out DIR]
    python correct.py serve  --ckpt RUN [--host 127.0.0.1 --port 8000] [--method off|gradient|select|guided]
                             [--num-samples 8 --margin 0] [--steps 3 --alpha 0.1 | --no-correction]
                             [--api-key KEY] [--max-connections 16 --max-pending 8 --idle-timeout 600 ...]
    python correct.py eval-sim --ckpt RUN [--tasks reach-v3,...] [--episodes 100] [--seed 100]
                               [--sigmas 0,0.3,0.5] [--method off,gradient,select,guided,oracle]
                               [--num-samples 1,4,8,16] [--steps 3 --alpha 0.03,0.1] [--margin 0]
                               [--guide-scale 0.1,0.3 --schedule linear --query a_hat] [--out DIR]
    python correct.py eval-sim --server HOST:PORT ...   (the same episodes through `serve`)

eval: ranking of expert vs perturbed chunks, correction of perturbed expert chunks and of the
policy's own samples on held-out frames (eqx_energy.offline_eval); prints a table, writes
report.json, sweep.png and energy_hist.png to --out (default RUN/correct_eval).
An output dir never overwrites an earlier evaluation: when --out (or the default) already holds files,
the results go to the first free sibling OUT-2, OUT-3, ... (printed at the end).
serve: a websocket server speaking openpi's protocol (eqx_energy.serve.server: access, limits, errors);
the method is the run's `inference` config section unless --method / --no-correction and the knob flags say otherwise.
It binds 127.0.0.1 unless --host says otherwise; with a key (--api-key, or the environment variable
EQX_ENERGY_API_KEY, which keeps it out of `ps`) clients must send `Authorization: Api-Key KEY`, as
openpi's client does with api_key; `eval-sim --server` sends the variable's key. SIGTERM or Ctrl-C
answers the requests in flight, then exits.
eval-sim: closed-loop Meta-World success rates (eqx_energy.sim.evaluate) of the uncorrected policy and
each correction setting, gaussian noise added before correction; results.json/.md and success.png.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path


_API_KEY_ENV = "EQX_ENERGY_API_KEY"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run dir (latest step) or RUN/checkpoints/STEP")
    parser.add_argument("--no-ema", action="store_true", help="use the raw trained params, not their EMA")


def _parser() -> argparse.ArgumentParser:
    from eqx_energy.serve import server as srv  # the server's defaults, shown in --help

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("eval", help="offline evaluation on held-out frames (default)")
    _common(ev)
    ev.add_argument("--data", help="LeRobot dataset (default: the run's data.root)")
    ev.add_argument("--split", default="holdout", choices=("holdout", "train", "all"))
    ev.add_argument("--frames", type=int, default=64, help="held-out frames to evaluate (bounds the work)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--alpha-sweep", help="comma-separated alphas (default: the run's correction.alpha)")
    ev.add_argument("--steps", help="comma-separated correction step counts (default: the run's)")
    ev.add_argument("--sigmas", default="0.1,0.3,1.0", help="gaussian perturbation scales for ranking")
    ev.add_argument("--correct-sigma", type=float, default=0.3, help="perturbation that correction must undo")
    ev.add_argument("--clip-frac", type=float)
    ev.add_argument("--first-only", action="store_true")
    ev.add_argument("--num-samples", default="1,2,4,8", help="comma-separated candidate counts n for selection/guidance")
    ev.add_argument("--guide-scales", default="0.3,1", help="comma-separated guided-sampling scales (lambda = scale (1 - t))")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="output dir (default: RUN/correct_eval); if it holds files, the next free OUT-N")
    sv = sub.add_parser("serve", help="websocket policy server (openpi protocol)")
    _common(sv)
    sv.add_argument("--host", default=srv.DEFAULT_HOST,
                    help="address to bind (default: %(default)s, loopback only); 0.0.0.0 serves the network")
    sv.add_argument("--port", type=int, default=srv.DEFAULT_PORT)
    sv.add_argument("--api-key", help=f"require 'Authorization: Api-Key KEY' (default: ${_API_KEY_ENV}, else no key)")
    limits = sv.add_argument_group("limits")
    limits.add_argument("--max-connections", type=int, default=srv.DEFAULT_MAX_CONNECTIONS,
                        help="concurrent connections; one more is closed with code 1013 (default %(default)s)")
    limits.add_argument("--max-pending", type=int, default=srv.DEFAULT_MAX_PENDING,
                        help="requests waiting for inference; one more gets a ServerBusy error (default %(default)s)")
    limits.add_argument("--max-queue", type=int, default=srv.DEFAULT_MAX_QUEUE,
                        help="frames buffered per connection before it stops reading (default %(default)s)")
    limits.add_argument("--max-size", type=int, default=srv.DEFAULT_MAX_SIZE,
                        help="largest message in bytes; a larger one closes with code 1009 (default %(default)s)")
    limits.add_argument("--idle-timeout", type=float, default=srv.DEFAULT_IDLE_TIMEOUT_S, dest="idle_timeout_s",
                        help="seconds without a request before a connection is closed; 0: never (default %(default)s)")
    limits.add_argument("--keepalive", type=float, default=srv.DEFAULT_KEEPALIVE_S, dest="keepalive_s",
                        help="seconds between pings and to answer a ping; a silent peer is dropped (default %(default)s)")
    sv.add_argument("--steps", type=int, help="correction steps (default: the run's)")
    sv.add_argument("--alpha", type=float)
    sv.add_argument("--clip-frac", type=float)
    sv.add_argument("--first-only", action="store_true")
    sv.add_argument("--method", choices=("off", "gradient", "select", "guided"),
                    help="energy-guided inference (see eval-sim); default: the run's inference.method")
    sv.add_argument("--no-correction", action="store_true", help="serve the policy's raw samples (= --method off)")
    sv.add_argument("--num-samples", type=int, help="select/guided: candidates per observation (default: the run's)")
    sv.add_argument("--margin", type=float, help="select/guided: keep the plain sample unless beaten by this")
    sv.add_argument("--guide-scale", type=float, help="guided: lambda scale (default: the run's)")
    sv.add_argument("--schedule", choices=("constant", "linear", "cosine"))
    sv.add_argument("--query", choices=("a_hat", "x_t"))
    sub.add_parser("eval-sim", help="closed-loop Meta-World evaluation (eqx_energy.sim.evaluate)", add_help=False)
    return parser


def _eval(args: argparse.Namespace) -> int:
    from eqx_energy import offline_eval as oe
    from eqx_energy._files import atomic_write, unused_dir
    from eqx_energy.checkpoints.load_run import load_run

    alphas = oe.parse_list(args.alpha_sweep, float, "--alpha-sweep") if args.alpha_sweep else None
    steps = oe.parse_list(args.steps, int, "--steps") if args.steps else None
    sigmas = oe.parse_list(args.sigmas, float, "--sigmas")
    num_samples = oe.parse_list(args.num_samples, int, "--num-samples")
    guide_scales = oe.parse_list(args.guide_scales, float, "--guide-scales")
    if min(num_samples) < 1:
        raise ValueError(f"--num-samples must all be >= 1; got {args.num_samples!r}")
    if args.frames < 1 or args.batch_size < 1:
        raise ValueError(f"--frames and --batch-size must be >= 1; got {args.frames}, {args.batch_size}")
    run = load_run(args.ckpt, use_ema=not args.no_ema)
    settings = oe.settings_for(
        run, alphas, steps, frames=args.frames, batch_size=args.batch_size, sigmas=sigmas,
        correct_sigma=args.correct_sigma, clip_frac=args.clip_frac, first_only=args.first_only, seed=args.seed,
        num_samples=num_samples, guide_scales=guide_scales,
    )
    source = oe.holdout_source(run, args.data, args.split)
    frames = oe.load_frames(run, source, settings.frames)
    report = oe.evaluate(run, frames, settings)
    out = unused_dir(Path(args.out) if args.out else run.run_dir / "correct_eval")
    report["run"] = {"run_dir": str(run.run_dir), "step": run.step, "ema": run.ema, "data": str(source.root),
                     "split": args.split}
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    plots = oe.save_plots(report, out)
    print(oe.format_table(report))
    print(f"\nwrote {out / 'report.json'}, " + ", ".join(str(p) for p in plots))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from eqx_energy.checkpoints.load_run import load_run
    from eqx_energy.serve.policy import EnergyPolicy, correction_from, inference_from
    from eqx_energy.serve.server import PolicyServer

    run = load_run(args.ckpt, use_ema=not args.no_ema)
    correction = correction_from(run, steps=args.steps, alpha=args.alpha, clip_frac=args.clip_frac,
                                 first_only=True if args.first_only else None)
    inference = inference_from(run, "off" if args.no_correction else args.method, num_samples=args.num_samples,
                               margin=args.margin, guide_scale=args.guide_scale, schedule=args.schedule,
                               query=args.query, correction=correction)
    api_key = args.api_key if args.api_key is not None else os.environ.get(_API_KEY_ENV)
    server = PolicyServer(
        EnergyPolicy(run, correction, inference=inference), host=args.host, port=args.port, api_key=api_key,
        max_connections=args.max_connections, max_pending=args.max_pending, max_queue=args.max_queue,
        max_size=args.max_size, idle_timeout_s=args.idle_timeout_s or None, keepalive_s=args.keepalive_s,
    )
    method = inference.method + (f" steps={correction.steps}" if inference.method == "gradient" else
                                 f" N={inference.num_samples}" if inference.method != "off" else "")
    print(f"serving {run.run_dir} step {run.step} on {args.host}:{args.port} ({method}, "
          f"{'API key required' if api_key is not None else 'no API key'})")
    server.serve_forever()
    return 0


def _eval_sim(argv: list[str]) -> int:
    """Closed loop in Meta-World (eqx_energy.sim.grid): every sigma x method setting on the same seeded episodes,
    each compared with "off" episode by episode (wins, losses, exact McNemar p in paired.json/.md)."""
    from eqx_energy.offline_eval import parse_list

    p = argparse.ArgumentParser(prog="correct.py eval-sim", description=_eval_sim.__doc__)
    p.add_argument("--ckpt", help="run dir (latest step) or RUN/checkpoints/STEP (not with --server)")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained params, not their EMA")
    p.add_argument("--tasks", default="reach-v3,button-press-v3,drawer-open-v3", help="Meta-World v3 task names")
    p.add_argument("--episodes", type=int, default=100, help="episodes per task and setting")
    p.add_argument("--seed", type=int, default=100, help="episode seed (the training data used MT1 seed 0)")
    p.add_argument("--sigmas", default="0", help="comma-separated gaussian action noise (env units), added before the energy acts")
    p.add_argument("--method", help="comma-separated: off, gradient (steps x alpha), select, guided, oracle (nearest the "
                   "scripted expert); default: off and the run's inference.method")
    p.add_argument("--num-samples", default="8", help="comma-separated candidate counts n (select, guided, oracle)")
    p.add_argument("--steps", help="comma-separated correction steps (default: the run's); 0 = off")
    p.add_argument("--alpha", help="comma-separated correction step sizes (default: the run's)")
    p.add_argument("--clip-frac", type=float)
    p.add_argument("--first-only", action="store_true")
    p.add_argument("--margin", type=float, help="select/guided: keep the plain sample unless the best beats it by this "
                   "(default: the run's inference.margin)")
    p.add_argument("--guide-scale", help="comma-separated guided-sampling scales lambda (default: the run's)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), help="lambda(t) schedule (default: the run's)")
    p.add_argument("--query", choices=("a_hat", "x_t"), help="guided: where the energy is evaluated (default: the run's)")
    p.add_argument("--no-baseline", action="store_true", help="skip the uncorrected policy (then nothing is paired)")
    p.add_argument("--replan-every", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--batch-envs", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64,
                   help="rendered camera size (the dataset's); a state-only policy renders nothing")
    p.add_argument("--policy-seed", type=int, default=0, help="the policy's sampling key")
    p.add_argument("--server", help="HOST:PORT of `correct.py serve`: drive the served policy (its own method; noise after it)")
    p.add_argument("--out", help="output dir (default: RUN/eval_sim); if it holds files, the next free OUT-N")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.server is None):
        raise ValueError(f"eval-sim needs exactly one of --ckpt (in process) or --server HOST:PORT; "
                         f"got --ckpt={args.ckpt}, --server={args.server}")
    from eqx_energy._files import unused_dir
    from eqx_energy.checkpoints.load_run import load_run
    from eqx_energy.serve.client import PolicyClient
    from eqx_energy.sim import grid
    from eqx_energy.sim.report import markdown_table, write_report

    tasks, sigmas = args.tasks.split(","), parse_list(args.sigmas, float, "--sigmas")
    common = dict(seed=args.seed, replan_every=args.replan_every, max_steps=args.max_steps, batch_envs=args.batch_envs,
                  image_size=args.image_size, progress=not args.no_progress)
    if args.server:
        host, _, port = args.server.rpartition(":")
        with PolicyClient(host, int(port), api_key=os.environ.get(_API_KEY_ENV), wait_s=60.0) as client:
            runs = grid.served_grid(client, tasks, args.episodes, sigmas, **common)
        out = Path(args.out or "eval_sim_served")
    else:
        run = load_run(args.ckpt, use_ema=not args.no_ema)
        methods = args.method.split(",") if args.method else ["off", run.cfg.inference.method]
        methods = [m for m in methods if not (args.no_baseline and m == "off")]
        settings = grid.inference_settings(
            run, methods, parse_list(args.num_samples, int, "--num-samples"),
            steps=parse_list(args.steps, int, "--steps") if args.steps else [run.cfg.correction.steps],
            alphas=parse_list(args.alpha, float, "--alpha") if args.alpha else [float(run.cfg.correction.alpha)],
            clip_frac=args.clip_frac, first_only=args.first_only, margin=args.margin,
            scales=parse_list(args.guide_scale, float, "--guide-scale") if args.guide_scale else [None],
            schedule=args.schedule, query=args.query,
        )
        runs = grid.run_grid(run, settings, tasks, args.episodes, sigmas, policy_seed=args.policy_seed, **common)
        out = Path(args.out) if args.out else run.run_dir / "eval_sim"
    out = unused_dir(out)
    paths = write_report(runs, out)
    baselines = grid.baselines_for(runs)
    paths |= grid.write_paired(runs, baselines, out)
    print(markdown_table(runs))
    print((out / "paired.md").read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval-sim"]:
        commands = argv
    elif not argv or argv[0] not in ("eval", "serve", "-h", "--help"):
        commands = ["eval", *argv]
    else:
        commands = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from eqx_energy.checkpoints.run import CheckpointError

    try:
        if commands[0] == "eval-sim":
            return _eval_sim(commands[1:])
        args = _parser().parse_args(commands)
        return _serve(args) if args.command == "serve" else _eval(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
