# The multi-zone lab (included by the Makefile).
#   make lab          global + zone-1 + zone-2 + a cluster DNS + a client per zone (each with a
#                     dataplane and the transparent proxy), in network namespaces (root)
#   make lab LAB_GLOBAL_REPLICAS=2
#                     the same with the global as two replicas (global, global-2) on one
#                     PostgreSQL server (a db host), the zones following the leader
#   make lab-status   every control plane and dataplane side by side
#   make lab-down     stop it all, remove the namespaces (safe to run any time)
#   make lab-docker   the global and zones with Docker Compose (lab/docker-compose.yml;
#                     its clients forward mesh. with dnsmasq, no dataplane)
#   make lab-docker-down
# BIN, LAB_STATE, LAB_PREFIX, LAB_DP_USER and LAB_GLOBAL_REPLICAS (see lab/lab.sh) may be
# given on the command line or in the environment; for the Docker lab also LAB_BASE_IMAGE,
# LAB_IMAGE, LAB_PROJECT, LAB_BUILD_NETWORK, LAB_CACHE and COMPOSE (see
# lab/docker/lab-docker.sh).
BIN ?= .venv/bin
LAB_STATE ?= lab/state
LAB_PREFIX ?= kzlab-
LAB_ENV = BIN='$(BIN)' LAB_STATE='$(LAB_STATE)' LAB_PREFIX='$(LAB_PREFIX)' \
  $(if $(LAB_DP_USER),LAB_DP_USER='$(LAB_DP_USER)') \
  $(if $(LAB_GLOBAL_REPLICAS),LAB_GLOBAL_REPLICAS='$(LAB_GLOBAL_REPLICAS)')
# Build .venv only when the lab runs from it (a test points BIN at its own virtualenv).
LAB_VENV := $(if $(filter $(abspath $(VENV)/bin),$(abspath $(BIN))),$(STAMP))
LAB_BASE_IMAGE ?= python:3.11-slim-bookworm
LAB_DOCKER_ENV = $(LAB_ENV) LAB_BASE_IMAGE='$(LAB_BASE_IMAGE)' \
  $(foreach v,LAB_IMAGE LAB_PROJECT LAB_BUILD_NETWORK LAB_CACHE COMPOSE,$(if $($(v)),$(v)='$($(v))'))

.PHONY: lab lab-down lab-status lab-tools lab-docker-tools lab-docker lab-docker-down lab-docker-status

# dnsmasq-base is the bare binary: unlike the dnsmasq package it starts no system-wide
# resolver when installed.  unbound (with dns-root-data, the root trust anchor) is for
# tests/lab/test_cluster_dns.py, which runs the binary itself: the system service the
# package enables is stopped and disabled at once, so nothing holds port 53 on the host
# or points resolv.conf at it.  nsd (the fake root and the reference server of
# tests/lab/test_conformance.py, with dnsviz and zonemaster-cli) likewise.  The
# dataplane tests (tests/lab/test_dataplane_netns.py, test_tproxy.py, and the lab's
# clients) need iptables (iptables-restore, ip6tables-restore), setpriv (util-linux)
# and, as the workload's real clients, musl-gcc, node and java/javac.  postgresql (its
# binaries only: no cluster is made or started) is the server of the global's replicas
# (make lab LAB_GLOBAL_REPLICAS=2, tests/lab/test_lab_replicas.py); curl reads their
# /ready in lab/README.md.
lab-tools: lab-docker-tools
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq-base"; \
	command -v dig >/dev/null || missing="$$missing bind9-dnsutils"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v unbound >/dev/null || [ -x /usr/sbin/unbound ] || missing="$$missing unbound"; \
	[ -f /usr/share/dns/root.key ] || missing="$$missing dns-root-data"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	command -v dnsviz >/dev/null || missing="$$missing dnsviz"; \
	command -v zonemaster-cli >/dev/null || missing="$$missing zonemaster-cli"; \
	[ -x /usr/sbin/nsd ] || missing="$$missing nsd"; \
	command -v iptables-restore >/dev/null || [ -x /usr/sbin/iptables-restore ] || missing="$$missing iptables"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	command -v musl-gcc >/dev/null || missing="$$missing musl-tools"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	{ command -v java >/dev/null && command -v javac >/dev/null; } || missing="$$missing default-jdk-headless"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "lab: installing$$missing"; \
	  case " $$missing " in *" postgresql "*) \
	    mkdir -p /etc/postgresql-common; \
	    test -e /etc/postgresql-common/createcluster.conf || \
	      echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf;; \
	  esac; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  case " $$missing " in *" nsd "*) \
	    if [ -d /run/systemd/system ]; then \
	      systemctl disable --now nsd.service >/dev/null 2>&1 || true; \
	    elif [ -x /etc/init.d/nsd ]; then \
	      /etc/init.d/nsd stop >/dev/null 2>&1 || true; \
	      update-rc.d nsd disable >/dev/null 2>&1 || true; \
	    fi;; \
	  esac; \
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

# The Docker lab's tools (tests/lab/test_docker_lab.py runs it): Debian's Docker
# engine, a Compose (v1 from Debian unless v2 is there) and debootstrap for the
# base image.  Installing docker.io starts no daemon: the test starts its own, on
# documentation addresses, and stops it again.
lab-docker-tools:
	@missing=""; \
	[ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "lab: installing$$missing"; \
	  policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  status=$$?; [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi

lab-docker: $(LAB_VENV)
	@$(LAB_DOCKER_ENV) bash lab/docker/lab-docker.sh up

lab-docker-status:
	@$(LAB_DOCKER_ENV) bash lab/docker/lab-docker.sh status

lab-docker-down:
	@$(LAB_DOCKER_ENV) bash lab/docker/lab-docker.sh down
