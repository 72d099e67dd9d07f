#!/bin/sh
# dsipam-cni-install: puts the dsipam CNI IPAM plugin and a dual-stack conflist on this node.
# The DaemonSet in deploy/kubernetes/cni.yaml runs it with the node's root (or
# just /opt/cni/bin, /opt/dsipam-cni and /etc/cni/net.d) mounted under $DSIPAM_CNI_HOST_ROOT.
#
#   1. copies the compiled plugin (bin/), or with DSIPAM_CNI_PLUGIN=python the Python runtime
#      and packages, to <bundle dir>/<version>/ and points <bundle dir>/current at it (a
#      symlink swapped with one rename);
#   2. writes <bin dir>/dsipam-cni: the compiled plugin (the bundle's bin/dsipam-cni, built
#      from clients/cni/go), or with DSIPAM_CNI_PLUGIN=python a shell wrapper that runs
#      `python -m dsipam.cni` with that runtime (written to a temporary name, then renamed:
#      never half a file), and the link <bin dir>/dsipam -> dsipam-cni (the IPAM type in the
#      conflist);
#   3. renders the conflist template (@SERVER@, @POOL@, @NODE_NAME@, @CNI_VERSION@),
#      checks that it is JSON and writes <conf dir>/<name> the same way; with credentials
#      (a directory holding `ca.crt` and this node's token, `token.<NODE_NAME>`, from the
#      Secret dsipam-cni-credentials: one shim token per node, each naming its node in the
#      server's auth config) it first copies them to <secrets dir> on the node (token mode
#      0600) and adds tokenFile, tls {ca, serverName} and transport "grpc" to every dsipam
#      IPAM section: the plugin sends a bearer token only over TLS. A plain `token` key (one
#      token for every node) is still read, with a warning: it cannot be a shim token. Without
#      a token in the Secret but with the pod's projected ServiceAccount token ($DSIPAM_CNI_SA_TOKEN,
#      audience dsipam, bound to this pod and so to this node), that token is copied instead (the
#      server reviews it with the API server and takes the node from it; the CA still comes from the
#      Secret or the node), and re-copied whenever the kubelet rotates it (every
#      $DSIPAM_CNI_TOKEN_REFRESH seconds it is compared). Without any of these, a `token` and `ca.crt`
#      already in <secrets dir> on the node (put there by the node's provisioning) are used as they are;
#   4. runs the installed plugin's VERSION command, so a broken runtime fails the pod;
#   5. with --once exits, otherwise waits for SIGTERM (the DaemonSet keeps the pod up so
#      that an image update re-runs the install).
# Every setting is an environment variable (defaults in brackets):
#   DSIPAM_CNI_HOST_ROOT [/host]  DSIPAM_CNI_BIN_DIR [/opt/cni/bin]  DSIPAM_CNI_CONF_DIR [/etc/cni/net.d]
#   DSIPAM_CNI_BUNDLE_DIR [/opt/dsipam-cni]  DSIPAM_CNI_CONFLIST_NAME [90-dsipam.conflist]
#   DSIPAM_CNI_TEMPLATE [/config/conflist.template]  DSIPAM_CNI_CREDENTIALS [/etc/dsipam-cni-credentials]
#   DSIPAM_CNI_SECRETS_DIR [/etc/dsipam-cni]  DSIPAM_CNI_TLS_SERVER_NAME [dsipam.dsipam-system.svc]
#   DSIPAM_CNI_SERVER [$DSIPAM_SERVICE_HOST:$DSIPAM_SERVICE_PORT_GRPC, from the Service's links]
#   DSIPAM_CNI_POOL [pods]  DSIPAM_CNI_VERSION [1.0.0]  NODE_NAME [hostname]  DSIPAM_CNI_VERIFY [1]
#   DSIPAM_CNI_BUNDLE_SRC [/opt/dsipam/cni-bundle]  DSIPAM_CNI_WRAPPER_SRC [/opt/dsipam/dsipam-cni.sh]
#   DSIPAM_CNI_SA_TOKEN [/var/run/secrets/dsipam/token]  DSIPAM_CNI_TOKEN_REFRESH [60]
#   DSIPAM_CNI_PLUGIN [compiled when the bundle has bin/dsipam-cni, else python]
set -eu

log() { echo "dsipam-cni-install: $*" >&2; }
die() { log "error: $*"; exit 1; }

once=0
for arg in "$@"; do
  case "$arg" in
    --once) once=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (expected --once)" ;;
  esac
done

root="${DSIPAM_CNI_HOST_ROOT-/host}"
bin_dir="${DSIPAM_CNI_BIN_DIR:-/opt/cni/bin}"
conf_dir="${DSIPAM_CNI_CONF_DIR:-/etc/cni/net.d}"
bundle_dir="${DSIPAM_CNI_BUNDLE_DIR:-/opt/dsipam-cni}"
conflist_name="${DSIPAM_CNI_CONFLIST_NAME:-90-dsipam.conflist}"
template="${DSIPAM_CNI_TEMPLATE:-/config/conflist.template}"
credentials="${DSIPAM_CNI_CREDENTIALS:-/etc/dsipam-cni-credentials}"
secrets_dir="${DSIPAM_CNI_SECRETS_DIR:-/etc/dsipam-cni}"
server_name="${DSIPAM_CNI_TLS_SERVER_NAME:-dsipam.dsipam-system.svc}"
server="${DSIPAM_CNI_SERVER:-}"
pool="${DSIPAM_CNI_POOL:-pods}"
cni_version="${DSIPAM_CNI_VERSION:-1.0.0}"
node="${NODE_NAME:-$(hostname)}"
verify="${DSIPAM_CNI_VERIFY:-1}"
bundle_src="${DSIPAM_CNI_BUNDLE_SRC:-/opt/dsipam/cni-bundle}"
wrapper_src="${DSIPAM_CNI_WRAPPER_SRC:-/opt/dsipam/dsipam-cni.sh}"
sa_token="${DSIPAM_CNI_SA_TOKEN:-/var/run/secrets/dsipam/token}"
token_refresh="${DSIPAM_CNI_TOKEN_REFRESH:-60}"
case "$token_refresh" in ''|*[!0-9]*|0) die "DSIPAM_CNI_TOKEN_REFRESH: '$token_refresh' is not a positive number of seconds" ;; esac

# Without DSIPAM_CNI_SERVER: the ClusterIP of the Service "dsipam" from the service-link variables.
if [ -z "$server" ] && [ -n "${DSIPAM_SERVICE_HOST:-}" ]; then
  port="${DSIPAM_SERVICE_PORT_GRPC:-${DSIPAM_SERVICE_PORT:-50051}}"
  case "$DSIPAM_SERVICE_HOST" in
    *:*) server="[$DSIPAM_SERVICE_HOST]:$port" ;;
    *) server="$DSIPAM_SERVICE_HOST:$port" ;;
  esac
fi
[ -n "$server" ] || die "DSIPAM_CNI_SERVER is not set and there is no DSIPAM_SERVICE_HOST (is the Service dsipam there? then restart this pod)"
case "$server" in *:*) ;; *) die "DSIPAM_CNI_SERVER: '$server' is not host:port" ;; esac
[ -d "$bundle_src/python" ] && [ -d "$bundle_src/site-packages" ] || die "DSIPAM_CNI_BUNDLE_SRC: $bundle_src has no python/ and site-packages/"
plugin_kind="${DSIPAM_CNI_PLUGIN:-}"
if [ -z "$plugin_kind" ]; then
  if [ -f "$bundle_src/bin/dsipam-cni" ]; then plugin_kind=compiled; else plugin_kind=python; fi
fi
case "$plugin_kind" in
  compiled) [ -x "$bundle_src/bin/dsipam-cni" ] || die "the compiled plugin $bundle_src/bin/dsipam-cni is not an executable" ;;
  python) [ -f "$wrapper_src" ] || die "DSIPAM_CNI_WRAPPER_SRC: $wrapper_src not found" ;;
  *) die "DSIPAM_CNI_PLUGIN: '$plugin_kind' is not compiled or python" ;;
esac
[ -f "$template" ] || die "DSIPAM_CNI_TEMPLATE: $template not found"
case "$conflist_name" in *.conflist) ;; *) die "DSIPAM_CNI_CONFLIST_NAME: '$conflist_name' must end in .conflist" ;; esac

# Escapes a value for the right-hand side of a sed s|||, and for a JSON string.
# A backslash becomes \\ and a quote \" in the JSON; | and & are literal for sed.
sed_value() { printf '%s' "$1" | sed -e 's/\\/\\\\\\\\/g' -e 's/"/\\\\"/g' -e 's/[|&]/\\&/g'; }

mkdir -p "$root$bin_dir" "$root$conf_dir" "$root$bundle_dir"

# 1. the runtime, in a new version directory; then swap the "current" symlink.
version="v$(date +%Y%m%d%H%M%S)-$$"
staging="$root$bundle_dir/.$version.tmp"
rm -rf "$staging"
if [ "$plugin_kind" = compiled ]; then
  # The compiled plugin needs nothing else on the node: not the 74 MB Python runtime. It must
  # answer VERSION before anything the node runs changes (the current link, the plugin).
  mkdir -p "$staging"
  cp -R "$bundle_src/bin" "$staging/bin"
  if [ "$verify" = 1 ] && ! out=$(printf '{"cniVersion":"%s"}' "$cni_version" \
      | CNI_COMMAND=VERSION "$staging/bin/dsipam-cni" 2>&1); then
    rm -rf "$staging"
    die "the installed plugin failed its VERSION command (the node's plugin is left as it was): $out"
  fi
  # The node's plugin is replaced before the current link moves: the Python wrapper it may
  # replace runs current/python, which a compiled-only version does not have.
  cp "$staging/bin/dsipam-cni" "$root$bin_dir/.dsipam-cni.tmp"
  chmod 0755 "$root$bin_dir/.dsipam-cni.tmp"
  mv -f "$root$bin_dir/.dsipam-cni.tmp" "$root$bin_dir/dsipam-cni"
else
  cp -R "$bundle_src" "$staging"
  # The staged runtime must answer VERSION before the current link moves to it.
  check="$root$bundle_dir/.verify-$$.sh"
  sed "s|@BUNDLE@|$(sed_value "$staging")|g" "$wrapper_src" > "$check"
  if [ "$verify" = 1 ] && ! out=$(printf '{"cniVersion":"%s"}' "$cni_version" | CNI_COMMAND=VERSION sh "$check" 2>&1); then
    rm -rf "$staging" "$check"
    die "the installed plugin failed its VERSION command (the node's plugin is left as it was): $out"
  fi
  rm -f "$check"
fi
mv "$staging" "$root$bundle_dir/$version"
ln -s "$version" "$root$bundle_dir/.current.tmp"
mv -T "$root$bundle_dir/.current.tmp" "$root$bundle_dir/current" 2>/dev/null \
  || { rm -f "$root$bundle_dir/current"; mv "$root$bundle_dir/.current.tmp" "$root$bundle_dir/current"; }
log "runtime in $bundle_dir/$version (current)"
# Keep the newest two versions: a plugin started just before the swap may still read the previous one.
ls -1d "$root$bundle_dir"/v* 2>/dev/null | sort -r | tail -n +3 | while read -r old; do rm -rf "$old"; done

# 2. the plugin: the compiled one was put in place in step 1; the wrapper of the Python one here.
if [ "$plugin_kind" = python ]; then
  sed "s|@BUNDLE@|$(sed_value "$bundle_dir/current")|g" "$wrapper_src" > "$root$bin_dir/.dsipam-cni.tmp"
  chmod 0755 "$root$bin_dir/.dsipam-cni.tmp"
  mv -f "$root$bin_dir/.dsipam-cni.tmp" "$root$bin_dir/dsipam-cni"
fi
# "type": "dsipam" in a network configuration finds the same plugin.
ln -sf dsipam-cni "$root$bin_dir/.dsipam.tmp"
mv -fT "$root$bin_dir/.dsipam.tmp" "$root$bin_dir/dsipam" 2>/dev/null \
  || { rm -f "$root$bin_dir/dsipam"; mv "$root$bin_dir/.dsipam.tmp" "$root$bin_dir/dsipam"; }
log "plugin $bin_dir/dsipam-cni, $plugin_kind (and the link $bin_dir/dsipam)"

# 3. the conflist.
tmp_conf="$root$conf_dir/.$conflist_name.tmp"
sed -e "s|@SERVER@|$(sed_value "$server")|g" -e "s|@POOL@|$(sed_value "$pool")|g" \
    -e "s|@NODE_NAME@|$(sed_value "$node")|g" -e "s|@CNI_VERSION@|$(sed_value "$cni_version")|g" \
    "$template" > "$tmp_conf"
if ! python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); assert c["plugins"], "no plugins"' "$tmp_conf"; then
  rm -f "$tmp_conf"
  die "the rendered conflist is not valid JSON with plugins: check $template"
fi
auth="none"
token_src=""
if [ -s "$credentials/token.$node" ]; then
  token_src="$credentials/token.$node"
elif [ -s "$credentials/token" ]; then
  token_src="$credentials/token"
  log "WARNING: $credentials/token is one token for every node; a shim token names its node, so give each node its own key token.<node name> (docs/security.md, \"Node-scoped shims\")"
elif [ -d "$credentials" ] && ls "$credentials"/token.* >/dev/null 2>&1; then
  rm -f "$tmp_conf"
  die "$credentials has tokens for other nodes but none for this node ($node): add the key token.$node (dsipam token new shim --node $node)"
fi
sa_mode=0
if [ -z "$token_src" ] && [ -s "$sa_token" ]; then
  # No token in the Secret: this pod's projected ServiceAccount token is the shim's identity.
  if [ ! -s "$credentials/ca.crt" ] && [ ! -s "$root$secrets_dir/ca.crt" ]; then
    rm -f "$tmp_conf"
    die "a ServiceAccount token ($sa_token) but no ca.crt in $credentials nor on the node: the plugin sends a token only over TLS"
  fi
  token_src="$sa_token"
  sa_mode=1
fi
provisioned=0
if [ -z "$token_src" ] && [ -s "$root$secrets_dir/token" ] && [ -s "$root$secrets_dir/ca.crt" ]; then
  # No token in the Secret: the node's provisioning put this node's own token and the CA on it.
  provisioned=1
fi
if [ -n "$token_src" ]; then
  if [ ! -s "$credentials/ca.crt" ] && [ "$sa_mode" = 0 ]; then
    rm -f "$tmp_conf"
    die "$credentials has a token but no ca.crt: the plugin sends a token only over TLS"
  fi
  mkdir -p "$root$secrets_dir"
  chmod 0755 "$root$secrets_dir"
  (umask 077 && cp "$token_src" "$root$secrets_dir/.token.tmp")
  mv -f "$root$secrets_dir/.token.tmp" "$root$secrets_dir/token"
  if [ -s "$credentials/ca.crt" ]; then
    cp "$credentials/ca.crt" "$root$secrets_dir/.ca.crt.tmp"
    chmod 0644 "$root$secrets_dir/.ca.crt.tmp"
    mv -f "$root$secrets_dir/.ca.crt.tmp" "$root$secrets_dir/ca.crt"
  fi
fi
if [ -n "$token_src" ] || [ "$provisioned" = 1 ]; then
  if ! python3 - "$tmp_conf" "$secrets_dir" "$server_name" <<'PY'
import json, sys
path, secrets, server_name = sys.argv[1:]
conf = json.load(open(path))
found = 0
for plugin in conf["plugins"]:
    ipam = plugin.get("ipam")
    if isinstance(ipam, dict) and ipam.get("type") in ("dsipam", "dsipam-cni"):
        ipam.update({"transport": "grpc", "tokenFile": f"{secrets}/token",
                     "tls": {"ca": f"{secrets}/ca.crt", "serverName": server_name}})
        found += 1
if not found:
    sys.exit("no ipam section of type dsipam in the template")
json.dump(conf, open(path, "w"), indent=2)
PY
  then
    rm -f "$tmp_conf"
    die "could not add the credentials to the conflist"
  fi
  if [ "$sa_mode" = 1 ]; then
    auth="ServiceAccount token over TLS ($sa_token, re-copied when it rotates), server name $server_name"
  elif [ "$provisioned" = 1 ]; then
    auth="token over TLS (provisioned on the node in $secrets_dir), server name $server_name"
  else
    auth="token over TLS (${token_src##*/}), server name $server_name"
  fi
fi
chmod 0644 "$tmp_conf"
mv -f "$tmp_conf" "$root$conf_dir/$conflist_name"
log "conflist $conf_dir/$conflist_name (server $server, pool $pool, node $node, auth: $auth)"

# 4. the installed plugin answers VERSION (the Python one run through the container's view of the bundle).
if [ "$verify" = 1 ]; then
  if [ "$plugin_kind" = compiled ]; then
    check="$root$bin_dir/dsipam-cni"
    run_check() { CNI_COMMAND=VERSION "$check"; }
  else
    check="$root$bundle_dir/.verify-$$.sh"
    sed "s|@BUNDLE@|$(sed_value "$root$bundle_dir/current")|g" "$wrapper_src" > "$check"
    run_check() { CNI_COMMAND=VERSION sh "$check"; }
  fi
  if ! out=$(printf '{"cniVersion":"%s"}' "$cni_version" | run_check 2>&1); then
    [ "$plugin_kind" = compiled ] || rm -f "$check"
    die "the installed plugin failed its VERSION command: $out"
  fi
  [ "$plugin_kind" = compiled ] || rm -f "$check"
  log "VERSION: $out"
fi

[ "$once" = 1 ] && exit 0
log "installed; waiting for SIGTERM"
trap 'log "stopping"; exit 0' TERM INT
if [ "$sa_mode" = 1 ]; then
  # The kubelet rotates the projected token: keep the node's copy (what the plugin reads on each
  # call) the same, replaced with one rename, never half a file.
  while :; do
    sleep "$token_refresh" & wait $! || true
    if [ -s "$sa_token" ] && ! cmp -s "$sa_token" "$root$secrets_dir/token"; then
      if (umask 077 && cp "$sa_token" "$root$secrets_dir/.token.tmp") \
          && mv -f "$root$secrets_dir/.token.tmp" "$root$secrets_dir/token"; then
        log "ServiceAccount token rotated: copied to $secrets_dir/token"
      else
        log "error: could not copy the rotated ServiceAccount token to $secrets_dir/token"
      fi
    fi
  done
fi
while :; do sleep 3600 & wait $! || true; done
