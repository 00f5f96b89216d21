//! Bad input, property-tested: whatever the manifests hold, parsing never
//! panics, what is valid still applies, and what comes out is servable
//! (ports in range, one owner per nodePort, sorted unique endpoints).

use std::collections::BTreeSet;

use kube_userspace_proxy::discovery::manifests::{parse, LastGood};
use kube_userspace_proxy::model::Snapshot;
use proptest::prelude::*;

fn service(name: &str, ports: &[(String, i64, Option<i64>)]) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, np)| {
            let np = np
                .map(|v| format!("\n      nodePort: {v}"))
                .unwrap_or_default();
            format!("    - name: \"{n}\"\n      port: {p}{np}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: \"{name}\"\n  namespace: ns\nspec:\n  type: NodePort\n  ports:\n{ports}"
    )
}

fn slice(name: &str, service: &str, port_name: &str, port: i64, addrs: &[String]) -> String {
    let eps: String = addrs
        .iter()
        .map(|a| format!("  - addresses: [\"{a}\"]\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \"{name}\"\n  namespace: ns\n  labels:\n    kubernetes.io/service-name: \"{service}\"\naddressType: IPv4\nports:\n  - name: \"{port_name}\"\n    port: {port}\nendpoints:\n{eps}"
    )
}

fn good() -> String {
    format!(
        "{}---\n{}",
        service("good", &[("web".into(), 80, Some(30080))]),
        slice(
            "good-1",
            "good",
            "web",
            8080,
            &["10.0.0.1".into(), "10.0.0.2".into()]
        )
    )
}

/// What every snapshot must satisfy to be served.
fn servable(s: &Snapshot) -> Result<(), String> {
    let mut node_ports = BTreeSet::new();
    for (name, e) in &s.services {
        if e.port.port == 0 {
            return Err(format!("{name}: port 0"));
        }
        if let Some(np) = e.port.node_port {
            if np == 0 || !node_ports.insert((np, name.protocol)) {
                return Err(format!("{name}: nodePort {np} zero or shared"));
            }
        }
        if e.endpoints.iter().any(|ep| ep.addr.port() == 0) {
            return Err(format!("{name}: endpoint port 0"));
        }
        if !e.endpoints.windows(2).all(|w| w[0].addr < w[1].addr) {
            return Err(format!("{name}: endpoints not sorted and unique"));
        }
    }
    Ok(())
}

fn port_value() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(65535),
        Just(65536),
        Just(-1),
        1i64..100,
        30000i64..30005,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_the_good_file_still_applies(junk in "(?s).{0,300}") {
        let files = vec![("a.yaml".to_string(), good()), ("b.yaml".to_string(), junk)];
        let (snap, _) = parse(&files, &mut LastGood::default());
        prop_assert!(snap.services.keys().any(|k| k.name == "good"));
        servable(&snap).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn mutated_manifests_never_panic_and_stay_servable(
        cut in 0usize..400,
        at in 0usize..400,
        insert in prop::sample::select(vec![
            "\n", ": ", "- ", "{", "]", "\"", "ports:", "port: 0", "port: 65536",
            "nodePort: -1", "\u{1F600}", "---\n", "addressType: FQDN", "  ", "null",
        ]),
    ) {
        let mut text = good();
        let at = (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.insert_str(at, insert);
        let cut = (0..=cut.max(1).min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let files = vec![("m.yaml".to_string(), text[..cut.max(at)].to_string())];
        let (snap, _) = parse(&files, &mut LastGood::default());
        servable(&snap).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn generated_services_are_validated_and_conflicts_resolved(
        services in prop::collection::vec(
            (
                "[a-z\u{e9}\u{6f22}-]{1,12}",
                prop::collection::vec(
                    ("[a-z\u{e9}]{0,3}", port_value(), prop::option::of(port_value())),
                    0..4,
                ),
                prop::collection::vec(1u8..=254, 0..20),
                port_value(),
            ),
            1..6,
        )
    ) {
        let mut files = Vec::new();
        for (i, (name, ports, hosts, target)) in services.iter().enumerate() {
            let port_name = ports.first().map(|p| p.0.clone()).unwrap_or_default();
            let addrs: Vec<String> = hosts.iter().map(|h| format!("10.1.{i}.{h}")).collect();
            files.push((
                format!("{i}.yaml"),
                format!("{}---\n{}", service(name, ports), slice(&format!("{name}-1"), name, &port_name, *target, &addrs)),
            ));
        }
        let mut last = LastGood::default();
        let (snap, _) = parse(&files, &mut last);
        servable(&snap).map_err(TestCaseError::fail)?;
        // The same input again is the same snapshot.
        let (again, _) = parse(&files, &mut last);
        prop_assert_eq!(snap, again);
    }
}

#[test]
fn ten_thousand_endpoints_in_one_slice() {
    let addrs: Vec<String> = (0..10_000)
        .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let text = format!(
        "{}---\n{}",
        service("big", &[("web".into(), 80, None)]),
        slice("big-1", "big", "web", 8080, &addrs)
    );
    let t0 = std::time::Instant::now();
    let (snap, problems) = parse(&[("big.yaml".into(), text)], &mut LastGood::default());
    eprintln!("10,000 endpoints parsed in {:?}", t0.elapsed());
    assert!(problems.is_empty(), "{problems:?}");
    let entry = snap.services.values().next().expect("served");
    assert_eq!(entry.endpoints.len(), 10_000);
}

#[test]
fn conflicting_node_ports_first_wins_the_other_is_reported_nothing_else_breaks() {
    let a = (
        "a.yaml".to_string(),
        service("first", &[("web".into(), 80, Some(30100))]),
    );
    let b = (
        "b.yaml".to_string(),
        service("second", &[("web".into(), 80, Some(30100))]),
    );
    let c = ("c.yaml".to_string(), good());
    let mut last = LastGood::default();
    let (snap, problems) = parse(&[a.clone(), b.clone(), c.clone()], &mut last);
    let np = |name: &str, s: &Snapshot| {
        s.services
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, e)| e.port.node_port)
            .expect("served")
    };
    assert_eq!(np("first", &snap), Some(30100));
    assert_eq!(np("second", &snap), None, "served without the nodePort");
    assert_eq!(np("good", &snap), Some(30080));
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert_eq!(
        (
            p.origin.starts_with("b.yaml"),
            p.object.as_str(),
            p.field.as_str()
        ),
        (true, "Service ns/second", "spec.ports[web].nodePort")
    );
    assert!(p.message.contains("ns/first:web"), "{}", p.message);

    // The holder keeps it even when the other now comes first.
    let (snap, _) = parse(&[b, a, c], &mut last);
    assert_eq!(np("first", &snap), Some(30100));
    assert_eq!(np("second", &snap), None);
}
