// Cosmos DB for NoSQL: the conversation store and the audit log (intelligence/stores/).
// Keyless: local (key) auth is off. The app's identity holds two data-plane roles, each
// on one container: "Cosmos DB Built-in Data Contributor" on conversations, and the
// custom "Lamina Audit Appender" (create, read, query; no replace, upsert or delete) on
// the audit log, so a compromised app can add entries but not rewrite or remove one.
// These are Cosmos SQL role assignments, not ARM ones: ARM roles do not reach Cosmos data.

param accountName string
param location string
param tags object

@description('Serverless (pay per request) or provisioned autoscale throughput.')
param serverless bool

@description('Autoscale ceiling of the database (RU/s), when not serverless.')
@minValue(1000)
param autoscaleMaxThroughput int

param databaseName string
param conversationsContainerName string
param auditContainerName string

@description('Principal (object) id of the app\'s managed identity.')
param principalId string

// Built-in data-plane role: read and write items, read container metadata.
var dataContributor = '00000000-0000-0000-0000-000000000002'

// What the audit store does (intelligence/stores/cosmos_audit.py): append an entry, read
// one back, query a tenant's chain to extend and verify it.
var auditAppenderActions = [
  'Microsoft.DocumentDB/databaseAccounts/readMetadata'
  'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers/items/create'
  'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers/items/read'
  'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers/executeQuery'
]

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: accountName
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    locations: [ { locationName: location, failoverPriority: 0, isZoneRedundant: false } ]
    consistencyPolicy: { defaultConsistencyLevel: 'Session' }
    capabilities: serverless ? [ { name: 'EnableServerless' } ] : []
    disableLocalAuth: true
    // Containers are made here, never by the app: a leaked token cannot drop them.
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    publicNetworkAccess: 'Enabled'
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: { id: databaseName }
    options: serverless ? {} : { autoscaleSettings: { maxThroughput: autoscaleMaxThroughput } }
  }
}

// One logical partition per conversation; a caller's idempotency claims in one more.
// TTL on with no default (-1): each item's own ttl carries its tenant's retention.
resource conversations 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: conversationsContainerName
  properties: {
    resource: {
      id: conversationsContainerName
      partitionKey: { paths: [ '/tenantId', '/userId', '/sessionId' ], kind: 'MultiHash', version: 2 }
      defaultTtl: -1
    }
  }
}

// One hash chain per tenant, one logical partition each. No TTL: the audit log is
// append-only and the app refuses a container that expires items.
resource audit 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: auditContainerName
  properties: {
    resource: {
      id: auditContainerName
      partitionKey: { paths: [ '/tenantId' ], kind: 'Hash', version: 2 }
    }
  }
}

// Data-plane scopes take the /dbs/<database>/colls/<container> form, not ARM ids.
var conversationsScope = '${account.id}/dbs/${database.name}/colls/${conversations.name}'
var auditScope = '${account.id}/dbs/${database.name}/colls/${audit.name}'

resource conversationsAccess 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: account
  name: guid(account.id, principalId, dataContributor, conversationsScope)
  properties: {
    roleDefinitionId: '${account.id}/sqlRoleDefinitions/${dataContributor}'
    principalId: principalId
    scope: conversationsScope
  }
}

resource auditAppender 'Microsoft.DocumentDB/databaseAccounts/sqlRoleDefinitions@2024-11-15' = {
  parent: account
  name: guid(account.id, 'Lamina Audit Appender')
  properties: {
    roleName: 'Lamina Audit Appender'
    type: 'CustomRole'
    assignableScopes: [ auditScope ]
    permissions: [ { dataActions: auditAppenderActions } ]
  }
}

resource auditAccess 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: account
  name: guid(account.id, principalId, auditAppender.id, auditScope)
  properties: {
    roleDefinitionId: auditAppender.id
    principalId: principalId
    scope: auditScope
  }
}

output endpoint string = account.properties.documentEndpoint
output databaseName string = database.name
output conversationsContainerName string = conversations.name
output auditContainerName string = audit.name
