# The multi-zone lab (included by the Makefile).
#   make lab          global + zone-1 + zone-2 + a client per zone, in network namespaces (root)
#   make lab-status   every control plane side by side
#   make lab-down     stop it all, remove the namespaces (safe to run any time)
#   make lab-docker   the same topology with Docker Compose (lab/docker-compose.yml)
# BIN, LAB_STATE and LAB_PREFIX may be given on the command line or in the environment.
BIN ?= .venv/bin
LAB_STATE ?= lab/state
LAB_PREFIX ?= kzlab-
LAB_ENV = BIN='$(BIN)' LAB_STATE='$(LAB_STATE)' LAB_PREFIX='$(LAB_PREFIX)'
# Build .venv only when the lab runs from it (a test points BIN at its own virtualenv).
LAB_VENV := $(if $(filter $(abspath $(VENV)/bin),$(abspath $(BIN))),$(STAMP))
COMPOSE ?= docker compose

.PHONY: lab lab-down lab-status lab-tools lab-docker lab-docker-down

# dnsmasq-base is the bare binary: unlike the dnsmasq package it starts no system-wide
# resolver when installed.  unbound (with dns-root-data, the root trust anchor) is for
# tests/lab/test_cluster_dns.py, which runs the binary itself: the system service the
# package enables is stopped and disabled at once, so nothing holds port 53 on the host
# or points resolv.conf at it.
lab-tools:
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq-base"; \
	command -v dig >/dev/null || missing="$$missing bind9-dnsutils"; \
	command -v unbound >/dev/null || [ -x /usr/sbin/unbound ] || missing="$$missing unbound"; \
	[ -f /usr/share/dns/root.key ] || missing="$$missing dns-root-data"; \
	if [ -n "$$missing" ]; then \
	  echo "lab: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  case " $$missing " in *" unbound "*) \
	    if [ -d /run/systemd/system ]; then \
	      systemctl disable --now unbound.service unbound-resolvconf.service >/dev/null 2>&1 || true; \
	    elif [ -x /etc/init.d/unbound ]; then \
	      /etc/init.d/unbound stop >/dev/null 2>&1 || true; \
	      update-rc.d unbound disable >/dev/null 2>&1 || true; \
	    fi;; \
	  esac; \
	fi

lab: $(LAB_VENV) lab-tools
	@$(LAB_ENV) bash lab/lab.sh up

lab-status:
	@$(LAB_ENV) bash lab/lab.sh status

lab-down:
	@$(LAB_ENV) bash lab/lab.sh down

lab-docker:
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "lab: '$(COMPOSE)' not found: make lab-docker needs Docker with the Compose plugin" >&2; exit 1; }
	$(COMPOSE) -f lab/docker-compose.yml up --build --detach
	@echo "lab: try  $(COMPOSE) -f lab/docker-compose.yml exec client-1 dig web.mesh"

lab-docker-down:
	$(COMPOSE) -f lab/docker-compose.yml down --volumes
