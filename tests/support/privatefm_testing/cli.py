"""``privatefm-cluster``: start, inspect and stop the local control plane and S3 server.

    privatefm-cluster up   [--dir DIR] [--node]  start everything; leaves it running, prints how to reach it
    privatefm-cluster env  [--dir DIR]           print shell exports for KUBECONFIG, PATH and the S3 settings
    privatefm-cluster down [--dir DIR]           stop every process the cluster started; with a node, also
                                                 remove its mounts, bridge, iptables chains and paths, and
                                                 fail if anything is left
    privatefm-cluster images [--reserve-gib N]   build and export the node's images ahead of the node
                                                 (which then only imports them)

--node adds a real node (containerd, runc, kubelet, kube-scheduler, a bridge CNI network) that runs
the project's own images, built from its Dockerfiles (privatefm_testing.node, .images). It needs
root and Debian's containerd, runc, containernetworking-plugins, iptables, nftables, buildah and mmdebstrap.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
from pathlib import Path

from privatefm_testing.cluster import BIN, ClusterState, LocalCluster

DEFAULT_DIR = Path(".run/cluster")


def exports(state: ClusterState) -> str:
    env = {
        "KUBECONFIG": state.kubeconfig,
        "PATH": f"{BIN}:$PATH",
        "PRIVATEFM_S3_BUCKET": state.s3.bucket,
        **state.s3.env(),
    }
    return "\n".join(f"export {k}={v if k == 'PATH' else shlex.quote(v)}" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privatefm-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "env", "down", "images"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="up: wipe the state directory first")
    parser.add_argument("--node", action="store_true", help="up: also start a real node running the project's images")
    parser.add_argument("--reserve-gib", type=float, default=0,
                        help="images: leave to the node each build that would leave less than this free")
    args = parser.parse_args(argv)
    directory: Path = args.dir.resolve()

    if args.command == "images":
        from privatefm_testing.images import prebuild

        logging.basicConfig(level=logging.INFO, format="[privatefm-cluster] %(message)s")
        print("built: " + (" ".join(prebuild(args.reserve_gib)) or "nothing (each image is built or imported already)"),
              file=sys.stderr)
        return 0
    if args.command == "up":
        if (directory / "cluster.json").exists():
            LocalCluster(directory).stop()
        if args.fresh and directory.exists():
            shutil.rmtree(directory)
        logging.basicConfig(level=logging.INFO, format="[privatefm-cluster] %(message)s")
        state = LocalCluster(directory, node=args.node).start()
        print(f"control plane: {state.server}  (kubeconfig {state.kubeconfig})", file=sys.stderr)
        print(f"S3 server:     {state.s3.endpoint}  bucket {state.s3.bucket}", file=sys.stderr)
        if state.node:
            print(f"node:          {state.node['name']} (pods on {state.node['gateway']}/24), images "
                  + " ".join(state.node["images"].values()), file=sys.stderr)
        print(f"stop with:     privatefm-cluster down --dir {directory}", file=sys.stderr)
        print(exports(state))
    elif args.command == "env":
        print(exports(ClusterState.load(directory)))
    elif (directory / "cluster.json").exists() or (directory / "node" / "host-before.json").exists():
        left = LocalCluster(directory).stop()
        if left:
            print("left behind:\n  " + "\n  ".join(left), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
