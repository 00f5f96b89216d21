//! Objects as the API server sent them: [`Raw`] JSON with leniently read
//! metadata, so that one object's content never fails a list or a watch.
//! The list/watch loop carries them; the API source's store decodes each
//! into its k8s-openapi type on its own.

use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

// === impl Raw ===

/// An object of kind `K` as the API sent it: JSON plus leniently read
/// metadata. Lists and watch events of `Raw` objects never fail on one
/// object's content; [`Raw::decode`] turns each into `K` separately.
pub struct Raw<K> {
    meta: ObjectMeta,
    value: Value,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Raw<K> {
    /// Wraps a JSON object.
    pub fn new(value: Value) -> Self {
        Self {
            meta: lenient_meta(&value),
            value,
            _kind: PhantomData,
        }
    }

    /// `namespace/name`, for logs and as the store key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.meta.namespace.clone().unwrap_or_default(),
            name: self.meta.name.clone().unwrap_or_default(),
        }
    }
}

impl<K: DeserializeOwned> Raw<K> {
    /// Decodes into the typed object, naming the failing field.
    pub fn decode(&self) -> Result<K, String> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let path = e.path().to_string();
            format!("field {path}: {}", e.into_inner())
        })
    }
}

/// The object's metadata if it decodes, else its name, namespace and
/// resourceVersion read one by one (what the watcher and store need).
fn lenient_meta(v: &Value) -> ObjectMeta {
    let m = v.get("metadata");
    if let Some(Ok(meta)) = m.map(ObjectMeta::deserialize) {
        return meta;
    }
    let s = |k: &str| {
        m.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(String::from)
    };
    ObjectMeta {
        name: s("name"),
        namespace: s("namespace"),
        resource_version: s("resourceVersion"),
        ..ObjectMeta::default()
    }
}

impl<K> Clone for Raw<K> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            value: self.value.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for Raw<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Raw")
            .field("namespace", &self.meta.namespace)
            .field("name", &self.meta.name)
            .finish_non_exhaustive()
    }
}

impl<'de, K> serde::Deserialize<'de> for Raw<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Self::new)
    }
}

impl<K: k8s_openapi::Resource> kube::Resource for Raw<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version(_: &()) -> std::borrow::Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    fn raw_service(v: Value) -> Raw<Service> {
        Raw::new(v)
    }

    #[test]
    fn a_broken_object_decodes_to_a_named_field_error_and_keeps_its_key() {
        let raw = raw_service(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"ports": [{"port": "eighty"}]}
        }));
        let err = raw.decode().unwrap_err();
        assert!(err.contains("spec.ports[0].port"), "{err}");
        assert_eq!(raw.key().to_string(), "ns/web");
        assert_eq!(raw.meta.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn broken_metadata_still_yields_name_and_resource_version() {
        let raw = raw_service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "9", "labels": 5}
        }));
        assert_eq!(raw.key().to_string(), "ns/web");
        assert_eq!(raw.meta.resource_version.as_deref(), Some("9"));
    }
}
