"""
The checks of deploy/test-kubernetes that need more than a shell: what the
rendered manifests promise of one another (check), and a run of the
rendered Deployment's container the way the kubelet would run it, with
podman (run).  Prints one PASS or FAIL line per check; exits 1 on any FAIL.

    python3 test_kubernetes.py check RENDERED.yaml [--overlay]
    python3 test_kubernetes.py run RENDERED.yaml IMAGE WORKDIR

Run by deploy/test-kubernetes, which installs what this needs (PyYAML,
bcrypt, podman, runc) and cleans up after it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import yaml

FAILURES: list[str] = []


def result(ok: bool, what: str, detail: str = "") -> bool:
    line = f"{'PASS' if ok else 'FAIL'}: {what}" + (f" ({detail})" if detail else "")
    print(line, flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


Objects = list[dict[str, Any]]


def load(path: str) -> Objects:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(objects: Objects, kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    if len(found) != 1:
        raise SystemExit(f"FAIL: expected one {kind}, found {len(found)}")
    return found[0]


def configMaps(objects: Objects) -> dict[str, Any]:
    return {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] in ("ConfigMap", "Secret")
    }


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def volumeFiles(objects: Objects, volume: dict[str, Any]) -> dict[str, bytes]:
    """
    The files the kubelet would put in C{volume}: key to bytes.
    """
    byName = configMaps(objects)
    sources: list[tuple[str, str]] = []
    if "projected" in volume:
        for source in volume["projected"]["sources"]:
            for kind in ("configMap", "secret"):
                if kind in source:
                    sources.append((kind, source[kind]["name"]))
    elif "configMap" in volume:
        sources.append(("configMap", volume["configMap"]["name"]))
    elif "secret" in volume:
        sources.append(("secret", volume["secret"]["secretName"]))
    files: dict[str, bytes] = {}
    for kind, name in sources:
        obj = byName[name]
        if kind == "secret":
            for key, value in obj.get("data", {}).items():
                files[key] = base64.b64decode(value)
            for key, value in obj.get("stringData", {}).items():
                files[key] = value.encode()
        else:
            for key, value in obj.get("data", {}).items():
                files[key] = value.encode()
    return files


def check(path: str, overlay: bool) -> None:
    objects = load(path)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = pod["containers"]
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    result(deployment["spec"].get("replicas") == 2, "Deployment: 2 replicas")
    result(
        psc.get("runAsNonRoot") is True
        and psc.get("runAsUser") == 65532
        and psc.get("runAsGroup") == 65532
        and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        "pod: runAsNonRoot, UID/GID 65532, seccomp RuntimeDefault",
    )
    result(
        csc.get("readOnlyRootFilesystem") is True
        and csc.get("allowPrivilegeEscalation") is False
        and csc.get("capabilities", {}).get("drop") == ["ALL"]
        and not csc.get("capabilities", {}).get("add")
        and not csc.get("privileged"),
        "container: read-only root, no privilege escalation, all capabilities dropped",
    )
    result(
        pod.get("automountServiceAccountToken") is False
        and pod.get("enableServiceLinks") is False,
        "pod: no service-account token, no service-link variables",
    )
    resources = container.get("resources", {})
    result(
        all(
            r in resources.get(kind, {})
            for kind in ("requests", "limits")
            for r in ("cpu", "memory")
        ),
        "container: CPU and memory requests and limits",
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    ready, live = container["readinessProbe"], container["livenessProbe"]
    readyPort = ports.get(ready["httpGet"]["port"], ready["httpGet"]["port"])
    livePort = ports.get(live["httpGet"]["port"], live["httpGet"]["port"])
    result(
        ready["httpGet"]["path"] == "/healthcheck" and readyPort == 2112,
        "readiness probe: /healthcheck on the metrics port 2112",
    )
    result(
        live["httpGet"]["path"] == "/livez" and livePort == 2112,
        "liveness probe: /livez on 2112, apart from readiness (stays 200 while "
        "draining)",
    )
    # The drain time the proxy will use: its configuration file, mounted.
    [mount] = [
        m for m in container["volumeMounts"] if m["mountPath"] == ("/etc/egressproxy")
    ]
    result(
        mount.get("readOnly") is True and "subPath" not in mount,
        "/etc/egressproxy mounted read-only, without subPath (so updates arrive)",
    )
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    files = volumeFiles(objects, volume)
    configArg = [a for a in container.get("args", []) if a.startswith("--config=")]
    configFile = configArg[0].split("=", 1)[1] if configArg else ""
    result(
        configFile.startswith("/etc/egressproxy/")
        and configFile[len("/etc/egressproxy/") :] in files,
        f"--config names a mounted file ({configFile})",
    )
    config = yaml.safe_load(files.get(os.path.basename(configFile), b"{}")) or {}
    drain = float(config.get("timeouts", {}).get("drain", 15))
    preStop = (container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})).get(
        "seconds", 0
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    result(
        grace > preStop + drain,
        "terminationGracePeriodSeconds above preStop + timeouts.drain",
        f"{grace} > {preStop} + {drain:g}",
    )
    acl = config.get("acl", {})
    checkers = config.get("auth", {}).get("checkers", [])
    wanted = [acl.get("file", "")] + [c.split(":", 1)[1] for c in checkers]
    result(
        all(
            p.startswith("/etc/egressproxy/") and os.path.basename(p) in files
            for p in wanted
        )
        and len(wanted) == 2,
        "the ACL and htpasswd files the config names are in the mounted volume",
        ", ".join(wanted),
    )
    result(
        float(acl.get("watch_interval", 0)) > 0,
        "acl.watch_interval set: ConfigMap/Secret updates reload without restart",
    )
    service = one(objects, "Service")
    targetPorts = {p["targetPort"] for p in service["spec"]["ports"]}
    result(
        selects(service["spec"]["selector"], labels) and targetPorts <= set(ports),
        "Service selects the pods, on named container ports",
    )
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = one(objects, kind)
        selector = obj["spec"].get("selector") or obj["spec"].get("podSelector")
        result(
            selects(selector.get("matchLabels", {}), labels),
            f"{kind} selects the pods",
        )
    hpa = one(objects, "HorizontalPodAutoscaler")
    result(
        hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        and hpa["spec"]["minReplicas"] >= 2,
        "HPA scales the Deployment, never below 2",
    )
    policy = one(objects, "NetworkPolicy")["spec"]
    proxyFrom = [
        rule["from"]
        for rule in policy["ingress"]
        if any(p["port"] in ("proxy", 9090) for p in rule.get("ports", []))
    ]
    result(
        len(proxyFrom) == 1
        and all(
            set(peer) == {"namespaceSelector"}
            and peer["namespaceSelector"].get("matchLabels")
            == {"egressproxy-client": "true"}
            for peer in proxyFrom[0]
        ),
        "NetworkPolicy: clients only from namespaces labelled egressproxy-client=true",
    )
    blocks = [
        peer["ipBlock"]
        for rule in policy["egress"]
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]
    v4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    result(
        len(v4) == 1
        and {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}
        <= set(v4[0].get("except", [])),
        "NetworkPolicy: egress to the internet but not private or link-local",
    )
    if overlay:
        monitor = one(objects, "ServiceMonitor")
        servicePorts = {p["name"] for p in service["spec"]["ports"]}
        result(
            monitor["apiVersion"] == "monitoring.coreos.com/v1"
            and selects(
                monitor["spec"]["selector"]["matchLabels"],
                service["metadata"]["labels"],
            )
            and all(
                e["port"] in servicePorts and e.get("path", "/metrics") == "/metrics"
                for e in monitor["spec"]["endpoints"]
            )
            and monitor["metadata"].get("namespace")
            == service["metadata"].get("namespace"),
            "ServiceMonitor selects the Service's metrics port, /metrics",
        )


# The kubelet-style run.


class Run:
    """
    The rendered Deployment's one container under podman, as the kubelet
    would start it: image, args, env, volumes, user, groups, read-only
    root, capabilities, no new privileges, seccomp, limits, grace period;
    in a network namespace of its own, with an origin beside it.
    """

    def __init__(self, rendered: str, image: str, work: str) -> None:
        self.objects = load(rendered)
        self.deployment = one(self.objects, "Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        [self.container] = self.pod["containers"]
        self.image = image
        self.work = work
        tag = os.path.basename(work)
        self.name = f"kubelet-{tag}"
        self.netns = f"kubelet-{tag}"
        self.origin: subprocess.Popen[bytes] | None = None
        self.ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.volumes: dict[str, str] = {}
        self.rotatedPassword = ""

    # Kubelet's atomic writer: files in a timestamped dir, ..data -> it,
    # visible names -> ..data/NAME.
    def writeVolume(self, name: str, files: dict[str, bytes], mode: int) -> None:
        root = os.path.join(self.work, "volumes", name)
        os.makedirs(root, exist_ok=True)
        generation = time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(time.time_ns())
        target = os.path.join(root, generation)
        os.mkdir(target, 0o755)
        group = self.pod.get("securityContext", {}).get("fsGroup")
        for key, content in files.items():
            path = os.path.join(target, key)
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, mode)
            if group is not None:
                os.chown(path, 0, group)
                os.chown(target, 0, group)
        data = os.path.join(root, "..data")
        old = os.path.realpath(data) if os.path.islink(data) else None
        os.symlink(generation, os.path.join(root, "..data_tmp"))
        os.rename(os.path.join(root, "..data_tmp"), data)
        for key in files:
            link = os.path.join(root, key)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", key), link)
        if old is not None:
            shutil.rmtree(old)
        self.volumes[name] = root

    def podmanArgs(self) -> list[str]:
        pod, c = self.pod, self.container
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        user = csc.get("runAsUser", psc.get("runAsUser"))
        group = csc.get("runAsGroup", psc.get("runAsGroup"))
        args = [
            "podman",
            "run",
            "--detach",
            "--pull=never",
            "--name",
            self.name,
            "--hostname",
            self.name,
            "--network",
            f"ns:/run/netns/{self.netns}",
            "--stop-timeout",
            str(pod.get("terminationGracePeriodSeconds", 30)),
        ]
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if psc.get("fsGroup") is not None:
            args += ["--group-add", str(psc["fsGroup"])]
        if csc.get("readOnlyRootFilesystem"):
            # Not podman's default tmpfs on /tmp, /run: the kubelet adds none.
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in csc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        for cap in csc.get("capabilities", {}).get("add", []):
            args += ["--cap-add", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            args += ["--security-opt", "seccomp=unconfined"]
        limits = c.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", limits["memory"].replace("Mi", "m").replace("Gi", "g")]
        for env in c.get("env", []):
            if "value" in env:
                value = env["value"]
            elif env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == (
                "metadata.name"
            ):
                value = self.name
            else:
                raise SystemExit(f"FAIL: cannot reproduce env {env['name']}")
            args += ["--env", f"{env['name']}={value}"]
        for mount in c.get("volumeMounts", []):
            if "subPath" in mount:
                raise SystemExit("FAIL: subPath mounts are not reproduced")
            ro = ":ro" if mount.get("readOnly") else ""
            args += [
                "--volume",
                f"{self.volumes[mount['name']]}:{mount['mountPath']}{ro}",
            ]
        if c.get("command"):
            args += ["--entrypoint", json.dumps(c["command"])]
        return args + [self.image] + list(c.get("args", []))

    def netnsCurl(self, *args: str, timeout: float = 10) -> tuple[str, str]:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "curl",
                "-s",
                "-m",
                str(timeout),
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
        body, _, code = out.stdout.rpartition("\n")
        return code, body

    def probe(self, which: str) -> str:
        get = self.container[which]["httpGet"]
        port = self.ports.get(get["port"], get["port"])
        return self.netnsCurl(f"http://127.0.0.1:{port}{get['path']}", timeout=3)[0]

    def proxied(self, url: str, user: str | None) -> str:
        proxy = f"http://127.0.0.1:{self.ports['proxy']}"
        args = ["-x", proxy]
        if user:
            args += ["--proxy-user", user]
        return self.netnsCurl(*args, url)[0]

    def hostPid(self) -> int:
        out = subprocess.run(
            ["podman", "inspect", "-f", "{{.State.Pid}}", self.name],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    def main(self, originPort: int, users: dict[str, str]) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(
            ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"],
            check=True,
        )
        self.origin = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                sys.executable,
                os.path.join(self.work, "origin.py"),
                str(originPort),
            ],
        )
        for volume in self.pod["volumes"]:
            mode = volume.get("projected", volume.get("configMap", {})).get(
                "defaultMode", 0o644
            )
            self.writeVolume(volume["name"], volumeFiles(self.objects, volume), mode)
        args = self.podmanArgs()
        print("RUN: " + " ".join(args), flush=True)
        started = subprocess.run(args, capture_output=True, text=True)
        if not result(started.returncode == 0, "container started", started.stderr):
            return
        t0 = time.monotonic()
        ready = ""
        while time.monotonic() - t0 < 30:
            ready = self.probe("readinessProbe")
            if ready == "200":
                break
            time.sleep(0.25)
        result(
            ready == "200",
            "readiness probe answers 200",
            f"after {time.monotonic() - t0:.1f} s",
        )
        result(self.probe("livenessProbe") == "200", "liveness probe answers 200")
        self.checkProcess()
        tester, password = next(iter(users.items()))
        result(
            self.proxied(
                "http://169.254.169.254/latest/meta-data/", f"{tester}:{password}"
            )
            == "403",
            "169.254.169.254 refused with 403 (ACL allows it; address policy does not)",
        )
        code = self.proxied(f"http://127.0.0.1:{originPort}/", f"{tester}:{password}")
        result(code == "200", "allowed loopback origin served", f"status {code}")
        code = self.proxied(f"http://127.0.0.1:{originPort}/", None)
        result(code == "407", "no credentials: 407", f"status {code}")
        self.rotate(originPort, tester, password)
        self.drain(originPort)

    def checkProcess(self) -> None:
        pid = self.hostPid()
        with open(f"/proc/{pid}/status") as f:
            status = dict(
                line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line
            )
        uids = status["Uid"].split()
        result(set(uids) == {"65532"}, "process runs as UID 65532", status["Uid"])
        result(
            int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0,
            "no capabilities, effective or bounding",
            f"CapEff {status['CapEff']}, CapBnd {status['CapBnd']}",
        )
        result(status.get("NoNewPrivs") == "1", "no_new_privs set")
        result(status.get("Seccomp") == "2", "seccomp filter in force")
        with open(f"/proc/{pid}/mountinfo") as f:
            rootOptions = [line.split()[5] for line in f if line.split()[4] == "/"]
        result(
            bool(rootOptions) and rootOptions[-1].split(",")[0] == "ro",
            "root filesystem mounted read-only",
            rootOptions[-1] if rootOptions else "no / mount",
        )
        # Each write must be refused; "checked" proves the shell ran.
        write = subprocess.run(
            [
                "podman",
                "exec",
                self.name,
                "sh",
                "-c",
                "for f in /etc/egressproxy/x /x /tmp/x /var/tmp/x /run/x; do "
                "if (echo x > $f) 2>/dev/null; then echo WROTE $f; fi; done; "
                "echo checked",
            ],
            capture_output=True,
            text=True,
        )
        result(
            write.stdout.strip() == "checked",
            "nothing writable: /etc/egressproxy, /, /tmp, /var/tmp, /run",
            write.stdout.strip().replace("\n", "; ") or write.stderr.strip(),
        )

    def rotate(self, originPort: int, tester: str, password: str) -> None:
        """
        Update the Secret as the kubelet would (a new ..data), and see the
        proxy use the new users without a restart.
        """
        [mount] = [
            m
            for m in self.container["volumeMounts"]
            if m["mountPath"] == "/etc/egressproxy"
        ]
        [volume] = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        files = volumeFiles(self.objects, volume)
        import bcrypt

        newPassword = self.rotatedPassword = "rotated-" + os.urandom(6).hex()
        hashed = bcrypt.hashpw(newPassword.encode(), bcrypt.gensalt(rounds=4))
        files["htpasswd"] = b"rotated:" + hashed + b"\n"
        acl = yaml.safe_load(files["acl.yaml"])
        acl["services"] = [dict(s, name="rotated") for s in acl["services"]]
        files["acl.yaml"] = yaml.safe_dump(acl).encode()
        pid = self.hostPid()
        mode = volume.get("projected", {}).get("defaultMode", 0o644)
        self.writeVolume(mount["name"], files, mode)
        t0 = time.monotonic()
        url = f"http://127.0.0.1:{originPort}/"
        new = old = ""
        while time.monotonic() - t0 < 20:
            new = self.proxied(url, f"rotated:{newPassword}")
            if new == "200":
                break
            time.sleep(0.5)
        took = time.monotonic() - t0
        old = self.proxied(url, f"{tester}:{password}")
        result(
            new == "200" and old == "407" and self.hostPid() == pid,
            "Secret and ConfigMap update reached the proxy without a restart",
            f"new user {new} after {took:.1f} s, old user {old}, same process",
        )

    def drain(self, originPort: int) -> None:
        slow = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "20",
                "-x",
                f"http://127.0.0.1:{self.ports['proxy']}",
                "--proxy-user",
                "rotated:" + self.rotatedPassword,
                f"http://127.0.0.1:{originPort}/slow",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1)
        t0 = time.monotonic()
        subprocess.run(
            ["podman", "kill", "--signal", "TERM", self.name],
            check=True,
            capture_output=True,
        )
        readiness, liveness = [], []
        for _ in range(4):
            time.sleep(0.3)
            readiness.append(self.probe("readinessProbe"))
            liveness.append(self.probe("livenessProbe"))
        result(
            readiness[-1] == "503" and all(c in ("200", "503") for c in readiness),
            "after SIGTERM readiness goes 503",
            ",".join(readiness),
        )
        result(
            all(c == "200" for c in liveness),
            "after SIGTERM liveness stays 200 while draining",
            ",".join(liveness),
        )
        code = slow.communicate(timeout=30)[0]
        result(
            code == "200",
            "in-flight request finished during the drain",
            f"status {code} after {time.monotonic() - t0:.1f} s",
        )
        grace = self.pod.get("terminationGracePeriodSeconds", 30)
        waited = subprocess.run(
            ["podman", "wait", self.name],
            capture_output=True,
            text=True,
            timeout=grace + 10,
        )
        took = time.monotonic() - t0
        result(
            waited.stdout.strip() == "0" and took < grace,
            "exited 0 within terminationGracePeriodSeconds",
            f"exit {waited.stdout.strip()} after {took:.1f} s, grace {grace} s",
        )
        logs = subprocess.run(
            ["podman", "logs", self.name], capture_output=True, text=True
        )
        text = logs.stdout + logs.stderr
        result(
            '"response_code":403' in text and "ACL reloaded" in text,
            "JSON access lines and the reload are in the container's log",
        )

    def cleanup(self) -> None:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", self.name], capture_output=True
        )
        if self.origin is not None:
            self.origin.terminate()
            self.origin.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def main() -> None:
    command = sys.argv[1]
    if command == "check":
        check(sys.argv[2], "--overlay" in sys.argv[3:])
    elif command == "run":
        rendered, image, work, originPort = sys.argv[2:6]
        users = json.loads(os.environ["TEST_USERS"])
        run = Run(rendered, image, work)
        try:
            run.main(int(originPort), users)
        finally:
            run.cleanup()
    if FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
