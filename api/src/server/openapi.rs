//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    backups, exports, images, metrics, networks, system, transfer, usage, users, vms, volumes,
};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Strata API", description = "Storage, backup and VM operations of a Strata appliance."),
    paths(
        system::health,
        system::list_tokens, system::create_token, system::revoke_token,
        system::list_jobs, system::job_status, system::cancel_job,
        images::list_images, images::create_image, images::image_info, images::remove_image,
        images::adopt_image,
        volumes::storage, volumes::check_group, volumes::create_rbd_group, volumes::remove_group,
        volumes::adopt_volume, volumes::list_volumes, volumes::create_volume, volumes::volume_info,
        volumes::remove_volume, volumes::resize_volume, volumes::snapshot_volume, volumes::clone_volume,
        transfer::convert, transfer::upload, transfer::download, transfer::download_volume,
        backups::list_backups, backups::create_backup, backups::restore_backup, backups::verify_backups,
        backups::prune_backups, backups::gc, backups::sync_backups, backups::list_stores,
        backups::add_store, backups::remove_store,
        vms::list_vms, vms::define_vm, vms::vm_info, vms::remove_vm, vms::start_vm, vms::stop_vm,
        exports::list_exports, exports::create_export, exports::export_info, exports::remove_export,
        vms::vm_status, vms::vm_console, vms::vm_console_stream, vms::pause_vm, vms::resume_vm,
        vms::power_button, vms::disk_stats,
        networks::list_networks, networks::create_network, networks::network_info,
        networks::remove_network,
        volumes::set_template, system::job_log,
        users::list_users, users::create_user, users::remove_user, users::set_password,
        usage::usage, metrics::serve,
        serve,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("ID.SECRET")
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document"), (status = 401, body = super::ErrorBody)))]
pub(super) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
