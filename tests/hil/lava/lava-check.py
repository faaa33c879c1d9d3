#!/usr/bin/python3
"""Check dmakern's LAVA job definitions without a LAVA lab (tests/lava.rs runs it).

  lava-check.py validate JOB.yaml...
      Validate each job with lava-common's schema, strictly (an unknown key is an error), as
      lava-server does when a job is submitted; also check that every monitor's pattern compiles
      the way the dispatcher compiles it and has the `result` and `test_case_id` groups.

  lava-check.py monitor JOB.yaml LOG [--pty] [--maxread N]
      Replay a console log through the job's `monitors` the way lava-dispatcher's
      lava-test-monitor action reads a connection: pexpect waits for `start`, then expects
      [EOF, TIMEOUT, end, pattern] in that order until `end`, maps `result` through `fixupdict`
      and normalises `test_case_id` as LAVA does. Prints one "MONITOR CASE RESULT" line per test
      case LAVA would record. --pty feeds the log through a pseudo-terminal, whose output
      processing turns each "\\r\\n" into "\\r\\r\\n" as LAVA sees a QEMU serial console; --maxread
      sets pexpect's read size (small values split lines between reads).

  lava-check.py qemu-command JOB.yaml IMAGE
      Print, one argument per line, the QEMU command line LAVA's `qemu` device type builds for the
      job (lava-server's device-types/qemu.jinja2 with the job's context, then the deploy action's
      image_arg with IMAGE as the downloaded file), so the job's configuration can be run here.

Exit status: 0 success, 1 an invalid job or a monitor error, 2 usage, 77 a Python module
(lava_common from Debian's lava-common, yaml, pexpect) is missing.
"""

import re
import shlex
import sys

USAGE = ("usage: lava-check.py validate JOB.yaml... | monitor JOB.yaml LOG [--pty] [--maxread N]"
         " | qemu-command JOB.yaml IMAGE")
EXIT_UNAVAILABLE = 77

try:
    import yaml
except ImportError:
    print("lava-check.py: python3-yaml is not installed (apt-get install python3-yaml)", file=sys.stderr)
    sys.exit(EXIT_UNAVAILABLE)


def load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def monitors_of(job):
    """The monitor blocks of every `test: monitors:` action, in job order."""
    found = []
    for action in job.get("actions", []):
        test = action.get("test") if isinstance(action, dict) else None
        if isinstance(test, dict):
            found.extend(test.get("monitors", []))
    return found


def check_pattern(monitor):
    """Problems with a monitor's regular expressions, as LAVA (through pexpect) compiles them."""
    problems = []
    for key in ("start", "end", "pattern"):
        try:
            compiled = re.compile(monitor[key], re.DOTALL)
        except re.error as e:
            problems.append(f"{key} does not compile: {e}")
            continue
        if key == "pattern":
            for group in ("result", "test_case_id"):
                if group not in compiled.groupindex:
                    problems.append(f"pattern has no `{group}` group")
    return problems


def validate(paths):
    try:
        import voluptuous
        from lava_common.schemas import validate as lava_validate
    except ImportError as e:
        print(f"lava-check.py: lava-common is not installed ({e}; apt-get install lava-common)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    status = 0
    for path in paths:
        job = load(path)
        try:
            lava_validate(job, strict=True)
        except voluptuous.Invalid as e:
            where = "/".join(str(p) for p in e.path)
            print(f"{path}: invalid: {e.msg} (at {where})")
            status = 1
            continue
        problems = []
        monitors = monitors_of(job)
        if not monitors:
            problems.append("no test action with monitors")
        for m in monitors:
            problems.extend(f"monitor {m['name']}: {p}" for p in check_pattern(m))
        if problems:
            print(f"{path}: invalid: {'; '.join(problems)}")
            status = 1
        else:
            print(f"{path}: valid ({job['device_type']})")
    return status


def normalise_case(case_id):
    """LAVA's test case name: stripped, lower case, runs of non-word characters as one '_'."""
    return re.sub(r"\W+", "_", case_id.strip().lower())


def monitor(job_path, log_path, pty, maxread):
    try:
        import pexpect
        import pexpect.fdpexpect
    except ImportError:
        print("lava-check.py: python3-pexpect is not installed (apt-get install python3-pexpect)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    monitors = monitors_of(load(job_path))
    if not monitors:
        print(f"lava-check.py: {job_path} has no monitors", file=sys.stderr)
        return 1
    options = {"encoding": "utf-8", "codec_errors": "replace", "maxread": maxread, "timeout": 10}
    if pty:
        child = pexpect.spawn("cat", [log_path], **options)
    else:
        log = open(log_path, "rb")
        child = pexpect.fdpexpect.fdspawn(log, **options)
    status = 0
    for m in monitors:
        name = m["name"].replace(" ", "-").lower()
        fixup = m.get("fixupdict") or {}
        try:
            child.expect(m["start"])
        except (pexpect.EOF, pexpect.TIMEOUT):
            print(f"lava-check.py: {name}: start string {m['start']!r} not found", file=sys.stderr)
            return 1
        events = [pexpect.EOF, pexpect.TIMEOUT, m["end"], m["pattern"]]
        while True:
            event = child.expect(events)
            if event == 0:
                print(f"lava-check.py: {name}: reached the end of the log before {m['end']!r}", file=sys.stderr)
                return 1
            if event == 1:
                print(f"lava-check.py: {name}: timed out", file=sys.stderr)
                return 1
            if event == 2:
                break
            groups = child.match.groupdict()
            result = fixup.get(groups["result"], groups["result"])
            if result not in ("pass", "fail", "skip", "unknown"):
                print(f"lava-check.py: {name}: bad test result {groups['result']!r}", file=sys.stderr)
                status = 1
                continue
            print(f"{name} {normalise_case(groups['test_case_id'])} {result}")
    return status


# The binaries the qemu device type runs per `arch` (the ARM ones; the template knows more).
QEMU_BINARIES = {"arm64": "qemu-system-aarch64", "aarch64": "qemu-system-aarch64", "arm": "qemu-system-arm"}


def qemu_command(job_path, image):
    """The qemu device type's command: its fixed options with the context's values (the template's
    defaults where the job gives none), the context's extra_options, then each tmpfs image's
    image_arg with the image's local path."""
    job = load(job_path)
    ctx = job.get("context", {})
    binary = QEMU_BINARIES.get(ctx.get("arch"))
    if binary is None:
        print(f"lava-check.py: {job_path}: context arch {ctx.get('arch')!r} is not an ARM QEMU", file=sys.stderr)
        return 1
    args = [binary, "-cpu", ctx.get("cpu", "cortex-a57"), "-machine", ctx.get("machine", "virt"), "-nographic",
            "-net", f"nic,{ctx.get('model', 'model=virtio')},macaddr=52:54:00:12:34:58",
            "-net", ctx.get("netdevice", "user"), "-m", str(ctx.get("memory", 512)),
            "-monitor", ctx.get("monitor", "none")]
    for option in ctx.get("extra_options", []):
        args.extend(shlex.split(option))
    images = [a["deploy"]["images"] for a in job["actions"] if "deploy" in a and a["deploy"].get("to") == "tmpfs"]
    if len(images) != 1 or len(images[0]) != 1:
        print(f"lava-check.py: {job_path}: expected one tmpfs deploy with one image", file=sys.stderr)
        return 1
    (name, spec), = images[0].items()
    args.extend(shlex.split(spec["image_arg"].format(**{name: image})))
    print("\n".join(args))
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "validate":
        return validate(argv[1:])
    if len(argv) >= 3 and argv[0] == "monitor":
        pty, maxread, rest = False, 2000, argv[3:]
        while rest:
            if rest[0] == "--pty":
                pty, rest = True, rest[1:]
            elif rest[0] == "--maxread" and len(rest) > 1 and rest[1].isdigit() and int(rest[1]) > 0:
                maxread, rest = int(rest[1]), rest[2:]
            else:
                print(USAGE, file=sys.stderr)
                return 2
        return monitor(argv[1], argv[2], pty, maxread)
    if len(argv) == 3 and argv[0] == "qemu-command":
        return qemu_command(argv[1], argv[2])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
